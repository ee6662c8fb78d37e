"""The language-model task (``QwT-llm/main.py``): its flags, model and text loading, and scoring."""
from .scoring import Scores, agreement, greedy_continuation, perplexity, score_windows
from .task import PROMPT, LanguageModel, main, parse_bits

__all__ = ["LanguageModel", "PROMPT", "Scores", "agreement", "greedy_continuation", "main", "parse_bits",
           "perplexity", "score_windows"]
