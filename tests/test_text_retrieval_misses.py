"""benchmarks/text_retrieval_misses.py: what text retrieval ranks first for each image."""

import numpy as np

from helpers import load_benchmark

misses = load_benchmark("text_retrieval_misses.py")


def test_each_first_ranked_caption_is_own_a_tie_or_another_image_s_true_false_or_undecided_caption():
    captions = ["a red circle on the left of a blue star", "a red circle",  # image 0
                "a red circle", "a green square with dots",  # image 1: shares "a red circle" with image 0
                "a striped cross", "a large yellow cross with stripes"]  # image 2
    text_to_image = np.array([0, 0, 1, 1, 2, 2])
    sim = np.zeros((5, 6))
    for image, caption in enumerate([0, 2, 3, 4, 5]):
        sim[image, caption] = 1.0
    # image 0: its own caption, held by no other image; image 1: its own "a red circle", which image 0 also has
    # (a tie R@1 counts as a miss); images 2-4 (3 and 4 without captions of their own): another image's caption,
    # true, false and undecided by the annotations.
    truth = {(3, 2): True, (4, 3): False, (5, 4): None}
    asked = []

    def true_of(caption, image):
        asked.append((caption, image))
        return truth[caption, image]

    classes, top = misses.first_ranked_classes(sim, captions, text_to_image, true_of)
    assert top.tolist() == [0, 2, 3, 4, 5]
    assert dict(classes) == {"own": 1, "same_words": 1, "true_other": 1, "false_other": 1, "undecided_other": 1}
    assert asked == [(3, 2), (4, 3), (5, 4)]  # the annotations are asked only about other images' captions
