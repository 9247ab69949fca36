"""How different are the text features of different captions, before any training?

    python benchmarks/text_feature_spread.py --config configs/pretrain/world.yaml \
        --captions WORLD/annotations/pretrain.json [--n 64] [key=value ...]

Builds the config's model (loading ``model.text.init``), encodes ``--n`` captions (the first caption of
each record of an ALBEF annotation file) with the text encoder and prints, for both poolings of
``model.text_pooling``, the cosine similarity between the pooled outputs of different captions (min,
mean, max over pairs). ITC aligns these features with the images; if every caption gives the same
vector (cosine ~1), there is nothing to align, and the run stays at chance however long it trains.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from softmask.config import load_config
from softmask.data.text import load_tokenizer, pre_caption, tokenize
from softmask.models.vlp import create_model, pool_text
from softmask.tasks.pretrain import pairwise_cosines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--captions", required=True, help="an ALBEF annotation file (JSON list of records)")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    records = json.loads(Path(args.captions).read_text())[: args.n]
    captions = [pre_caption(r["caption"] if isinstance(r["caption"], str) else r["caption"][0], cfg.data.max_words)
                for r in records]
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    ids, mask = tokenize(tokenizer, captions)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg).eval()
    with torch.no_grad():
        embeds = model.encode_text(ids, mask)
    layers = cfg.model.text.fusion_layer
    print(f"{len(captions)} captions, text encoder output (after {layers} layer(s); init "
          f"'{cfg.model.text.init or 'random'}'): cosine between different captions")
    for pooling in ("cls", "mean"):
        cos = pairwise_cosines(pool_text(embeds, mask, pooling))
        print(f"  {pooling:>4}: min {cos.min():.5f}  mean {cos.mean():.5f}  max {cos.max():.5f}")


if __name__ == "__main__":
    main()
