"""Serve deployments: one module per deployment (chat, embedding, tokenizer); chat_engine/ holds generation."""
