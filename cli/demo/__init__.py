"""`fieldline demo`: the whole local stack, its LLM chat and its live view."""
