"""ChatGLM2-6B / ChatGLM3-6B checkpoints in their original layout, converted to transformers' native GLM.

The original folders need their own remote code, which no longer runs on current transformers; their
architecture is GLM-4's, so the weights map onto `GlmForCausalLM`, the SentencePiece model onto a fast
tokenizer, and the prompt formats onto chat templates. The result loads with no remote code and runs on the
continuous-batching engine.
"""
