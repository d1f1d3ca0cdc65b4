"""minalign: readable self-alignment (rejection sampling, iterative DPO) for Mistral and Mixtral."""
from minalign.config import ModelConfig, get_config
from minalign.model import Transformer
from minalign.checkpoint import load_model, save_model
from minalign.tokenizer import Tokenizer, load_tokenizer
from minalign.chat import TEMPLATES, render_conversation, render_prompt, render_text
from kernels import token_logprobs
from minalign.logprobs import sequence_logprobs
from minalign.sampling import Sample, generate

__all__ = ["ModelConfig", "get_config", "Transformer", "load_model", "save_model", "Tokenizer", "load_tokenizer"]
__all__ += ["TEMPLATES", "render_conversation", "render_prompt", "render_text"]
__all__ += ["sequence_logprobs", "token_logprobs", "Sample", "generate"]
