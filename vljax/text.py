"""Label-name canonicalisation shared by training and evaluation (pure Python, no vljax imports).

The trainer's label prompts (vljax/objective.py) and the evaluators' class prompts
(vljax/evaluators/prompts.py) clean class names the same way, so that a model trained on
"ankle_boot" is asked about "ankle boot" at evaluation. It lives on this floor so that the
objective need not import the evaluators.
"""
import re


def canonicalize_name(name: str) -> str:
    """Light clean-up of a class name that keeps its punctuation ("T-shirt/top" stays readable).

    '_' -> ' ', lowercase, whitespace collapsed and stripped (what CLIP_benchmark's curated
    class-name lists look like).
    """
    return re.sub(r"\s+", " ", name.replace("_", " ").lower()).strip()
