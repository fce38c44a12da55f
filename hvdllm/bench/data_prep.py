"""`hvdllm bench JOB --data`: data preparation throughput and peak memory, side by side.

The corpus is the job's `data.source` written out as .jsonl files of about 1 MB (documents
repeated, renamed, until the corpus reaches the 1x size), and the same eight times over (8x).
A first prepare trains the job's BPE; every row then prepares with that tokenizer (so BPE
training is not timed) into a fresh directory, in separate processes, alternating over repeats:

  tokenizer, 1 thread      the tokenizer's own encode_batch on the corpus text (the target's base)
  prepare, 1 worker        data.workers=1, one thread (TOKENIZERS_PARALLELISM=false); 1x and 8x,
                           whose peak resident memory is the memory row
  prepare, 1 process + tokenizer threads   data.workers=1, the tokenizer's own parallelism
  prepare, N workers       data.workers=0: one single-threaded worker per core

MB/s counts document text (UTF-8), tokens/s tokens written; a prepare's time is the one its final
log line reports (interpreter start excluded). The target: N workers >= 0.8 x N x the tokenizer's
one-thread rate.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hvdllm.bench.launcher import hvdllm_command, module_command, set_args
from hvdllm.config import load_job
from hvdllm.data.sources import iter_documents, resolve_source
from hvdllm.log import logger

FINAL = re.compile(r"([\d,]+) tokens, (\d+) shards in .*: ([\d.]+) s, ([\d.]+) MB/s, ([\d,]+) tokens/s$")
FILE_BYTES = 1_000_000


def write_corpus(source: str, root: Path, min_bytes: int, copies: int = 1) -> int:
    """The source's documents as .jsonl files under root, repeated to min_bytes, `copies` times
    (each copy's documents named apart); returns the bytes written."""
    texts = [d.text for d in iter_documents(resolve_source(source))]
    root.mkdir(parents=True, exist_ok=True)
    written, n, f = 0, 0, None
    for copy in range(copies):
        done = 0
        while done < min_bytes:
            for text in texts:
                if f is None or f.tell() >= FILE_BYTES:
                    if f is not None:
                        f.close()
                    f = (root / f"part-{n:05d}.jsonl").open("w")
                    n += 1
                line = json.dumps({"text": f"# copy {copy} {done}\n{text}"}) + "\n"
                f.write(line)
                done += len(line)
                if done >= min_bytes:
                    break
        written += done
    f.close()
    return written


def run_prepare(job_path: str, sets: list[str], data: Path, env: dict[str, str]) -> dict:
    """One `hvdllm prepare` in its own process: its reported time, rates and peak memory."""
    cmd = module_command("hvdllm.bench.data_prep", "peak", *hvdllm_command(
        "prepare", job_path, *set_args([*sets, f"data.dir={data}"])))
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=3600)
    lines = [m for line in p.stderr.splitlines() if (m := FINAL.search(line))]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"bench prepare failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    tokens, shards, seconds, mb_s, tok_s = lines[-1].groups()
    return {"seconds": float(seconds), "mb_s": float(mb_s), "tokens_s": float(tok_s.replace(",", "")),
            "tokens": int(tokens.replace(",", "")), "shards": int(shards),
            "peak_mb": float(p.stdout.strip().splitlines()[-1])}


def tokenizer_rate(tokenizer_dir: Path, corpus: Path) -> dict:
    """The tokenizer's own one-thread rate on the corpus text (in a fresh process)."""
    cmd = module_command("hvdllm.bench.data_prep", "encode", str(tokenizer_dir), str(corpus))
    p = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                       capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(p.stdout)


def _encode(tokenizer_dir: str, corpus: str) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    texts = [json.loads(line)["text"] for p in sorted(Path(corpus).glob("*.jsonl"))
             for line in p.open()]
    batches, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= 1 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    start, tokens = time.perf_counter(), 0
    for b in batches:
        tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(b))
    seconds = time.perf_counter() - start
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(json.dumps({"seconds": seconds, "mb_s": mb / seconds, "tokens_s": tokens / seconds}))


ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false"}
ROWS = [  # name, corpus, --set values, environment
    ("prepare, 1 worker, 1x", "1x", ["data.workers=1"], ONE_THREAD),
    ("prepare, 1 worker, 8x", "8x", ["data.workers=1"], ONE_THREAD),
    ("prepare, 1 process + tokenizer threads", "1x", ["data.workers=1"], {"TOKENIZERS_PARALLELISM": "true"}),
    ("prepare, all cores (workers)", "1x", ["data.workers=0"], {}),
]


def data_bench(job_path: str, sets: list[str], out: Path, quick: bool = False, repeats: int = 0) -> dict:
    """Every row `repeats` times, alternating; writes out/data.json and out/data.md."""
    job = load_job(job_path, sets)
    repeats, mb = repeats or (1 if quick else 2), 4 if quick else 16
    out.mkdir(parents=True, exist_ok=True)
    corpora = {}
    for name, copies in (("1x", 1), ("8x", 8)):
        corpora[name] = out / "corpus" / name
        if not corpora[name].is_dir():
            write_corpus(job.data.source, corpora[name], mb * 1_000_000, copies)
    base = [*sets, "data.shard_bytes=1000000"]
    first = run_prepare(job_path, [*base, f"data.source={corpora['1x']}"], out / "prep" / "bpe", {})
    tokenizer = out / "prep" / "bpe" / "tokenizer"
    logger.info("bench --data: corpus %d MB (1x), tokenizer trained (%d tokens)", mb, first["tokens"])
    results: dict[str, list[dict]] = {name: [] for name, *_ in ROWS}
    results["tokenizer, 1 thread"] = []
    for r in range(repeats):
        results["tokenizer, 1 thread"].append(tokenizer_rate(tokenizer, corpora["1x"]))
        for name, corpus, extra, env in ROWS:
            data = out / "prep" / f"{name.replace(' ', '_').replace(',', '')}-{r}"
            row_sets = [*base, f"data.source={corpora[corpus]}", f"data.tokenizer={tokenizer}", *extra]
            results[name].append(run_prepare(job_path, row_sets, data, env))
            logger.info("bench --data %d/%d %-42s %.2f MB/s", r + 1, repeats, name, results[name][-1]["mb_s"])
    summary = summarise(results, mb)
    (out / "data.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "data.md").write_text(data_markdown(summary))
    return summary


def summarise(results: dict[str, list[dict]], mb: int) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = {name: {k: statistics.median(r[k] for r in runs) for k in ("mb_s", "tokens_s")}
            | {"peak_mb": max((r.get("peak_mb", 0) for r in runs), default=0)}
            for name, runs in results.items()}
    single = rows["tokenizer, 1 thread"]["tokens_s"]
    best = rows["prepare, all cores (workers)"]["tokens_s"]
    return {"cores": cores, "corpus_mb": mb, "rows": rows,
            "target_tokens_s": 0.8 * cores * single, "all_cores_vs_target": best / (0.8 * cores * single),
            "peak_mb_1x": rows["prepare, 1 worker, 1x"]["peak_mb"],
            "peak_mb_8x": rows["prepare, 1 worker, 8x"]["peak_mb"]}


def data_markdown(s: dict) -> str:
    """The rows as a markdown table, the target and the memory line."""
    lines = [f"Data preparation, {s['corpus_mb']} MB corpus (1x), {s['cores']} cores", "",
             "| row | MB/s | tokens/s | peak RSS MB |", "|---|---:|---:|---:|"]
    for name, r in s["rows"].items():
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] else ""
        lines.append(f"| {name} | {r['mb_s']:.2f} | {r['tokens_s']:,.0f} | {peak} |")
    lines += ["", f"Target (0.8 x {s['cores']} cores x the tokenizer's 1-thread rate): "
              f"{s['target_tokens_s']:,.0f} tokens/s; all cores reach {s['all_cores_vs_target']:.2f} of it.",
              f"Peak memory, one worker: {s['peak_mb_1x']:.0f} MB at 1x, {s['peak_mb_8x']:.0f} MB at 8x.", ""]
    return "\n".join(lines)


def _peak(cmd: list[str]) -> int:
    """Run cmd; print its peak RSS (MB, the largest process of its tree) last on stdout."""
    status = subprocess.call(cmd)
    print(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f}", flush=True)
    return status


if __name__ == "__main__":  # python -m hvdllm.bench.data_prep peak CMD... | encode TOKENIZER CORPUS
    if sys.argv[1] == "peak":
        sys.exit(_peak(sys.argv[2:]))
    _encode(sys.argv[2], sys.argv[3])
