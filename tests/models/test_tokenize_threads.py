"""``StableDiffusion.tokenize`` from several threads at once (the scoring engine's loader
threads): every call pads to the text encoder's length. transformers' tokenizers keep their
padding and truncation settings as state between calls, so unguarded concurrent calls mixed
``padding=False`` into ``padding="max_length"`` calls and returned short rows."""

from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["a cat, the cat", "the fox", "a tea cat", "the sea", "cats at the sea", "t"]


def test_concurrent_tokenize_pads_every_row(sd):
    with ThreadPoolExecutor(8) as pool:
        shapes = set(pool.map(lambda p: sd.tokenize([p]).shape, PROMPTS * 200))
    assert shapes == {(1, 77)}
