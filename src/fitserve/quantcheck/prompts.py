"""The built-in prompts of `fitserve check-quant`: short user messages of different kinds
(facts, arithmetic, code, translation, writing, reasoning), so that a setting is judged on
more than one sort of text. Sent through the model's chat template when it has one."""

from __future__ import annotations

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "What is 17 multiplied by 23?",
    "Write a Python function that returns the factorial of n.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "List three uses of a paperclip.",
    "Write a haiku about autumn leaves.",
    "Who wrote the play Romeo and Juliet?",
    "If a train travels 60 miles in 1.5 hours, what is its average speed?",
    "Summarize the water cycle for a ten-year-old.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a short recipe for pancakes.",
    "Name the planets of the solar system in order from the Sun.",
    "What does HTTP stand for, and what is it used for?",
    "Write the opening line of a mystery novel.",
    "Why do we have seasons on Earth?",
)
