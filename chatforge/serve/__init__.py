"""``chatforge serve``: an OpenAI-compatible server over continuous batching, with a web chat and a labelling page."""
