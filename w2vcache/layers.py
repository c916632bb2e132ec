"""Layer names and the `--layers` / `--layer` syntax every command shares.

"layer00" is the transformer input after the positional convolution, "layerNN" the output of
block NN, "cnn" the CNN feature encoder's output (see backbone.py). No torch here: the sharing
commands use this without loading a model.

A probe's `--layer` also takes "weighted": one probe over every numbered layer at once, with learnt
softmax weights (probe.py).
"""

import re
from collections.abc import Sequence

import numpy as np

from .errors import W2VCacheError


WEIGHTED = "weighted"  # --layer weighted: a learnt weighted sum of the numbered layers


def layer_name(index: int) -> str:
    """8 -> "layer08"."""
    return f"layer{index:02d}"


def layer_index(name: str) -> int | None:
    """"layer08" -> 8; None for a layer without a number (the CNN output, "cnn")."""
    match = re.fullmatch(r"layer(\d+)", name)
    return int(match[1]) if match else None


def describe_layers(layers: dict[str, int]) -> str:
    """A store's layers for a person, numbered ones as ranges: "13 layers 0-12, dim 768";
    "4 layers 0, 4-6, dim 768"; "6 layers cnn (dim 512), 0-4 (dim 768)"."""
    segments = []  # [names, dim]: runs of consecutive numbered layers of one width, or one named layer
    for name, dim in layers.items():
        index, last = layer_index(name), segments[-1] if segments else None
        if (index is not None and last and last[1] == dim and layer_index(last[0][-1]) is not None
                and layer_index(last[0][-1]) + 1 == index):
            last[0].append(name)
        else:
            segments.append([[name], dim])

    def text(names):
        first, last = layer_index(names[0]), layer_index(names[-1])
        return names[0] if first is None else f"{first}" if first == last else f"{first}-{last}"

    count = f"{len(layers)} layer{'s' * (len(layers) != 1)}"
    if len({dim for _, dim in segments}) == 1:
        return f"{count} {', '.join(text(n) for n, _ in segments)}, dim {segments[0][1]}"
    return f"{count} " + ", ".join(f"{text(n)} (dim {dim})" for n, dim in segments)


def choose_layers(spec: str | Sequence[str | int] | None, available: Sequence[str], where: str,
                  owner: str = "the store") -> list[str]:
    """'all' | '6-9' | 'cnn,0,8' | ['layer06', 7] -> names from `available` (a store's or a model's
    layers), in their order. `where` and `owner` word the errors ("--layer", "the model").

    Numbers and ranges name transformer layers ("layer06"); names are taken as they are.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return list(available)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = set()
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            names = [layer_name(int(item))]
        else:
            text = str(item).strip()
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
            if text in available:
                names = [text]
            elif match:
                lo, hi = int(match[1]), int(match[2] or match[1])
                if lo > hi:
                    raise W2VCacheError(f"{where}: layers {spec!r}: range {text} is empty")
                names = [layer_name(i) for i in range(lo, hi + 1)]
            elif text == "cnn":  # a name w2vcache knows, absent from this store
                raise W2VCacheError(f"{where}: layers {spec!r}: {owner} has no layer cnn (the CNN encoder's "
                                    f"output is stored only by `extract --cnn`); it has {', '.join(available)}")
            else:
                raise W2VCacheError(f"{where}: layers {spec!r}: {text!r} is neither a layer name "
                                    f"nor a number or range like 6-9; {owner} has {', '.join(available)}")
        for name in names:
            if name not in available:
                raise W2VCacheError(f"{where}: layers {spec!r}: {owner} has no layer {name}; it has "
                                    f"{', '.join(available)}")
        chosen.update(names)
    if not chosen:
        raise W2VCacheError(f"{where}: layers {spec!r} names no layer")
    return [name for name in available if name in chosen]


def weighted_layers(available: Sequence[str]) -> list[str]:
    """The layers a weighted probe sums: every numbered one ("layer00", the transformer's input,
    included, as s3prl sums all hidden states). The CNN output is left out: its width differs."""
    return [name for name in available if layer_index(name) is not None]
