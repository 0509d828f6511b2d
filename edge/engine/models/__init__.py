"""Model families the engine runs (Llama and Qwen2 share one implementation)."""
