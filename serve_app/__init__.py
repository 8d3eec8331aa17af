"""glm-serve: ChatGLM-family chat, sentence embeddings and tokenization as a Ray Serve deployment graph."""
