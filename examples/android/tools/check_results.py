"""The Python side of the results contract: read the results JSON the JVM core wrote (as the phone's app
does) with `edgelm validate --runner adb`'s reader, and check that edgelm reaches the same verdicts.

    python check_results.py BUNDLE RESULTS_JSON
    python check_results.py --generative BUNDLE RESULTS_JSON
    python check_results.py --early-exit BUNDLE RESULTS_JSON REPLAY_NPZ

BUNDLE is the export bundle (dist/pixel8); the JVM test's replay runner answered the ONNX artifact with
negated logits and every other artifact with the reference, so ONNX must fail its golden check and the
others pass. With --generative (a text-generation bundle) the replay decoder drifted from the reference on
all but 4 of the 32 golden prompts: edgelm must read the same token agreement, mean prefix and perplexity
ratio as the JVM core computed and fail the artifact on agreement, as the JVM did. With --early-exit (an
early-exit classifier's bundle) the JVM ran the cascades on their segments' replayed outputs: edgelm must read
the exits its own cascade session takes and pass them. Exit 0 when they agree.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def read_as_edgelm(bundle, results: dict, names: list[str]) -> dict:
    """The validation record `edgelm validate --runner adb` makes of ``results`` for ``names``."""
    from edgelm.validate.bundle import ResultStore, evaluate
    from edgelm.validate.runners import parse_device_results

    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(Path(tmp))
        for run in parse_device_results(results, names):
            store.save(run)
        first = results["artifacts"][0]
        (Path(tmp) / "runner.json").write_text(
            json.dumps(
                {
                    "runner": "adb",
                    "kind": "adb",
                    "emulated": False,
                    "artifacts": names,
                    "warmup": first["warmup"],
                    "runs": first["runs"],
                }
            )
        )
        return evaluate(bundle, Path(tmp))


def generative(bundle, results: dict) -> int:
    entry = results["artifacts"][0]
    name, jvm = entry["artifact"], entry["golden"]
    a = read_as_edgelm(bundle, results, [name])["artifacts"][name]
    fid = a["fidelity"]
    print(
        f"check_results: {name}: edgelm {a['status']} ({a['checks']['golden']['detail']}); the JVM said {jvm['detail']}"
    )
    ok = a["status"] == "failed" and jvm["passed"] is False and "token agreement" in jvm["detail"]
    for key in ("token_agreement", "mean_prefix", "perplexity_ratio"):
        same = abs(fid[key] - jvm[key]) < 1e-6
        print(f"check_results: {key}: edgelm {fid[key]:.6f}, JVM {jvm[key]:.6f}" + ("" if same else "  DIFFERENT"))
        ok &= same
    ok &= a["speed"]["decode_tokens_per_s"] > 0 and a["next_token"]["top1_agreement"] is not None
    tok = results.get("tokenization") or {}
    ok &= tok.get("mismatched") == 0 and tok.get("decode_mismatched") == 0 and tok.get("rows", 0) > 32
    print(f"check_results: on-device byte-level BPE over the bundle's tokenizer cases: {tok.get('by_corpus')}")
    print("check_results: " + ("OK, edgelm and the JVM core agree (generation)" if ok else "FAILED"))
    return 0 if ok else 1


def early_exit(bundle, results: dict, replay_file: str) -> int:
    """The early-exit bundle: the JVM core ran each cascade on its segments' replayed outputs; edgelm must read
    the exit layers edgelm's own cascade session took on the golden rows (their distribution), the per-sentence
    latency of every row, and pass the cascades' golden check as the JVM did."""
    import numpy as np

    replay = np.load(replay_file)
    names = [e["artifact"] for e in results["artifacts"]]
    record = read_as_edgelm(bundle, results, names)
    ok = True
    for i, name in enumerate(str(n) for n in replay["cascades"]):
        a, want = record["artifacts"][name], replay[f"{i}_exit_layers"]
        layers, counts = np.unique(want, return_counts=True)
        share = {str(int(k)): float(c / len(want)) for k, c in zip(layers, counts, strict=True)}
        exits, sentences = a.get("exits") or {}, a.get("sentence_latency") or {}
        same = exits.get("share") == share and abs(exits.get("mean_layers", -1) - float(want.mean())) < 1e-9
        print(
            f"check_results: {name}: edgelm {a['status']} ({a['checks']['golden']['detail']}); exits "
            f"{exits.get('share')} (edgelm's cascade session: {share}), {sentences.get('rows')} sentences timed"
        )
        ok &= a["status"] == "passed" and same and sentences.get("rows") == len(want)
    print("check_results: " + ("OK, edgelm and the JVM core agree (early exit)" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> int:
    from edgelm.bundle import Bundle

    args = sys.argv[1:]
    if args[:1] == ["--early-exit"]:
        return early_exit(Bundle.load(args[1]), json.loads(Path(args[2]).read_text()), args[3])
    gen = args[:1] == ["--generative"]
    args = args[1:] if gen else args
    bundle, results = Bundle.load(args[0]), json.loads(Path(args[1]).read_text())
    if gen:
        return generative(bundle, results)
    names = bundle.artifact_names
    record = read_as_edgelm(bundle, results, names)
    ok = True
    for name, a in record["artifacts"].items():
        want = "failed" if name.endswith(".onnx") else "passed"
        golden = a["checks"].get("golden", {})
        print(
            f"check_results: {name}: {a['status']} (golden: {golden.get('detail')}); the JVM said "
            f"{next(e['golden']['detail'] for e in results['artifacts'] if e['artifact'] == name)}"
        )
        ok &= a["status"] == want and a.get("eval", {}).get("rows") == len(bundle.golden["texts"])
    tok = results.get("tokenization") or {}
    ok &= tok.get("mismatched") == 0 and tok.get("rows", 0) > 0
    print(f"check_results: on-device tokenization of the golden texts: {tok}")
    print("check_results: " + ("OK, edgelm and the JVM core agree" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
