"""benchmarks/text_retrieval_misses.py: what text retrieval ranks first for each image."""

import numpy as np

from helpers import load_benchmark

misses = load_benchmark("text_retrieval_misses.py")


def test_each_first_ranked_caption_is_own_a_tie_a_short_or_a_long_caption_of_another_image():
    captions = ["a red circle on the left of a blue star", "a red circle",  # image 0
                "a red circle", "a green square with dots",  # image 1: shares "a red circle" with image 0
                "a striped cross", "a large yellow cross with stripes next to a star"]  # image 2
    text_to_image = np.array([0, 0, 1, 1, 2, 2])
    sim = np.full((5, 6), 0.0)
    sim[0, 0] = 1.0  # image 0: its own long caption, held by no other image
    sim[1, 2] = 1.0  # image 1: its own "a red circle", which image 0 also has: a tie R@1 counts as a miss
    sim[2, 3] = 1.0  # image 2: another image's caption of 5 words: long with --short 4
    sim[3, 4] = 1.0  # image 3 (no caption of its own): another image's short caption
    sim[4, 5] = 1.0  # image 4: another image's long caption
    classes, top = misses.first_ranked_classes(sim, captions, text_to_image, short=4)
    assert top.tolist() == [0, 2, 3, 4, 5]
    assert dict(classes) == {"own": 1, "same_words": 1, "long_other": 2, "short_other": 1}
    assert misses.first_ranked_classes(sim, captions, text_to_image, short=5)[0]["short_other"] == 2
