"""Ask a served 28x28 digit model about handwritten digits from another source, via tritonclient.

    python examples/other_digits.py --url 127.0.0.1:8000 --model lenet5-mixed

The digits are scikit-learn's ``load_digits``: 1,797 digits written by 43 people (UCI "optdigits"),
none of them in MNIST, stored as 8x8 images of 0..16. They are brought to MNIST's own format the
way MNIST was made from NIST: the digit's bounding box scaled (aspect ratio kept, bicubic) to fit
20x20, then placed in a 28x28 field with its centre of mass at the centre, values 0..255. An 8x8
original holds far less detail than MNIST's 20x20 strokes: this measures how a model trained on
MNIST transfers to a coarser kind of handwriting, not its MNIST accuracy.

Sends each batch as an image-shaped tensor [B, 1, 28, 28] (or [B, 784] to a model that reads
flat pixels), reads "probabilities", prints the accuracy and the confusion per digit.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
import tritonclient.http as httpclient
from sklearn.datasets import load_digits

BOX, FIELD = 20, 28  # MNIST: digits fit a 20x20 box inside a 28x28 field


def to_mnist_format(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> (N, 28, 28) float32 values 0..255, as described above."""
    out = np.zeros((len(images), FIELD, FIELD), np.float32)
    for i, image in enumerate(torch.tensor(images, dtype=torch.float32) / 16):
        rows, cols = (image > 0.05).nonzero(as_tuple=True)
        crop = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        scale = BOX / max(crop.shape)
        h, w = (max(1, round(s * scale)) for s in crop.shape)
        box = F.interpolate(crop[None, None], size=(h, w), mode="bicubic", align_corners=False)
        box = box[0, 0].clamp(0, 1)
        mass = box.sum().clamp_min(1e-6)
        cy = float((box.sum(1) * torch.arange(h)).sum() / mass)
        cx = float((box.sum(0) * torch.arange(w)).sum() / mass)
        top = min(max(round(FIELD / 2 - cy), 0), FIELD - h)
        left = min(max(round(FIELD / 2 - cx), 0), FIELD - w)
        out[i, top : top + h, left : left + w] = box.numpy() * 255
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of smartmixed-serve")
    parser.add_argument("--model", required=True, action="append", help="model name (repeatable)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    digits = load_digits()
    images, labels = to_mnist_format(digits.images), digits.target
    client = httpclient.InferenceServerClient(url=args.url)
    for model in args.model:
        dims = client.get_model_metadata(model)["inputs"][0]["shape"][1:]
        if int(np.prod(dims)) != FIELD * FIELD:
            print(f"{model}: reads {dims}, not 28x28 pixels", file=sys.stderr)
            return 2
        predicted = []
        for start in range(0, len(images), args.batch):
            batch = images[start : start + args.batch].reshape(-1, *dims)
            tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=True)
            wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
            answer = client.infer(model, [tensor], outputs=wanted)
            predicted.append(answer.as_numpy("probabilities").argmax(1))
        predicted = np.concatenate(predicted)
        accuracy = float((predicted == labels).mean())
        per_digit = ", ".join(f"{d}: {(predicted[labels == d] == d).mean():.2f}" for d in range(10))
        print(f"{model}: {accuracy:.4f} of {len(labels)} digits ({per_digit})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
