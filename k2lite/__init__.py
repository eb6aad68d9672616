"""k2lite: a small, fast, readable inference engine for Kimi K2 (DeepSeek-V3 architecture)."""
from .config import Config
from .errors import ModelFormatError
from .generate import ChatResult, Completion
from .llm import LLM, Sequence, load

__all__ = ["ChatResult", "Completion", "Config", "LLM", "ModelFormatError", "Sequence", "load"]

try:
    from .tokenizer import Tokenizer
    from .chat import StreamParser, parse_assistant
    __all__ += ["Tokenizer", "StreamParser", "parse_assistant"]
except ImportError:     # the tokenizer module needs tiktoken; the engine itself does not
    pass

__version__ = "0.1.0"
