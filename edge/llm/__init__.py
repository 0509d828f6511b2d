"""The local LLM: the served runtime, completions, chat templates, response cache, prefetch, explanations."""
