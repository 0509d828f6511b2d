"""The local LLM: runtime, completions, stop strings, chat templates, response cache, prefetch,
explanations, their metrics, and the LlmServices holder the agent and the gateway use."""
