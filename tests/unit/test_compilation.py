"""Piecewise compilation on the CPU: the split, the compiled pieces, the disk cache, padding
to capture sizes and the CUDA-graph strategy's replay logic (with a CPU stand-in for graphs).

Models are tiny seeded random-weight Llamas run through attention's no-cache path (the
tokens form one causal sequence), so padded rows at the end never change the real rows.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._inductor
from piston import SamplingParams
from piston.attention.forward_context import ForwardContext, set_forward_context
from piston.attention.layer import attention_layers
from piston.compilation.attention_op import attention as attention_op
from piston.compilation.capture import NoCapture, default_capture_sizes, pad_to_capture_size
from piston.compilation.compile_cache import CompileCache
from piston.compilation.compiled_model import compile_model, resolve_mode
from piston.models.loader import load_model
from piston.step.config import CompilationConfig, EngineConfig, ModelConfig
from piston_cuda.cuda_graph import CudaGraphStrategy
from transformers import LlamaConfig

NUM_LAYERS = 3
VOCAB = 512


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama-compile")
    LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return str(folder)


def _model(folder: str) -> torch.nn.Module:
    model = load_model(ModelConfig(model=folder, path=folder, load_format="dummy"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # dummy weights are ~1e-3: give the logits some spread
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _config(folder: str, cache_dir, mode: str = "piecewise", enforce_eager: bool = False,
            capture_sizes=None) -> EngineConfig:
    mc = ModelConfig(model=folder, path=folder, load_format="dummy", enforce_eager=enforce_eager)
    return EngineConfig(mc, compilation_config=CompilationConfig(mode=mode, capture_sizes=capture_sizes,
                                                                 cache_dir=str(cache_dir)))


def _no_cache_ctx(model) -> ForwardContext:
    return ForwardContext(attn_metadata=None, kv_caches=[], attn_impl=None, attn_layers=attention_layers(model))


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=gen), torch.arange(n)


def test_pad_to_capture_size_picks_next_size_and_leaves_larger_batches():
    sizes = default_capture_sizes(48)
    assert sizes == [1, 2, 4, 8, 16, 32, 48]
    assert default_capture_sizes(256)[-3:] == [64, 128, 256]
    assert [pad_to_capture_size(n, sizes) for n in (1, 3, 8, 33, 48, 49)] == [1, 4, 8, 48, 48, 49]
    assert NoCapture().padded_num_tokens(3) == 3


def test_enforce_eager_and_auto_on_cpu_run_the_plain_model(tiny_folder, tmp_path):
    model = _model(tiny_folder)
    cfg = _config(tiny_folder, tmp_path, mode="piecewise", enforce_eager=True)
    assert resolve_mode(cfg, "piecewise") == "eager"
    assert compile_model(model, cfg, torch.device("cpu"), attention_layers(model)) is None
    assert resolve_mode(_config(tiny_folder, tmp_path, mode="auto"), "eager") == "eager"
    assert resolve_mode(_config(tiny_folder, tmp_path, mode="auto"), "piecewise") == "piecewise"


def test_split_gives_one_piece_per_layer_plus_one(tiny_folder, tmp_path):
    model = _model(tiny_folder)
    compiled = compile_model(model, _config(tiny_folder, tmp_path), torch.device("cpu"), attention_layers(model),
                             backend="eager")
    assert compiled.num_pieces == NUM_LAYERS + 1
    assert len(compiled.split.attention_names) == NUM_LAYERS
    attention_calls = [n for n in compiled.graph.graph.nodes
                       if n.op == "call_module" and n.target in compiled.split.attention_names]
    assert len(attention_calls) == NUM_LAYERS
    # Between the pieces attention runs eagerly, calling the op's body without torch's dispatcher.
    from piston.compilation.attention_op import run_attention

    for name in compiled.split.attention_names:
        targets = [n.target for n in compiled.graph.get_submodule(name).graph.nodes if n.op == "call_function"]
        assert run_attention in targets and torch.ops.piston.attention.default not in targets


@pytest.mark.parametrize("tuple_return", [True, False], ids=["split_module-tuple_return", "wrapped-by-piston"])
def test_split_pieces_return_tuples_on_any_torch(tiny_folder, tmp_path, monkeypatch, tuple_return):
    """torch < 2.12 has no split_module(tuple_return=True): Piston wraps lone outputs itself,
    and the split model computes the same as the plain one either way."""
    import piston.compilation.piecewise as piecewise

    monkeypatch.setattr(piecewise, "SPLIT_HAS_TUPLE_RETURN", tuple_return and piecewise.SPLIT_HAS_TUPLE_RETURN)
    model = _model(tiny_folder)
    compiled = compile_model(model, _config(tiny_folder, tmp_path), torch.device("cpu"), attention_layers(model),
                             backend="eager")
    with torch.inference_mode(), set_forward_context(_no_cache_ctx(model)):
        ids, pos = _inputs(5, seed=1)
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos), rtol=1e-6, atol=1e-6)
    for name in compiled.split.piece_names + compiled.split.attention_names:
        output = next(n for n in compiled.graph.get_submodule(name).graph.nodes if n.op == "output")
        assert isinstance(output.args[0], (tuple, list)), name


def test_attention_op_outside_a_forward_context_says_what_to_do():
    q = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="forward context"):
        attention_op(q, q, q, torch.empty_like(q), 0)


def test_inductor_pieces_match_eager_and_second_start_hits_cache(tiny_folder, tmp_path, caplog):
    model = _model(tiny_folder)
    layers = attention_layers(model)
    cfg = _config(tiny_folder, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="piston.compilation"):
        first = compile_model(model, cfg, torch.device("cpu"), layers)
    assert "Compiled the model in" in caplog.text
    # The middle layers' pieces are identical: first, middle and last compile, the rest share.
    assert [p.source for p in first.split.pieces] == ["compiled", "compiled", "shared", "compiled"]
    assert (first.cache.hits, first.cache.misses) == (0, 3)

    second = compile_model(_model(tiny_folder), cfg, torch.device("cpu"), layers)
    assert (second.cache.hits, second.cache.misses) == (2 + 1, 0)
    assert {p.source for p in second.split.pieces} == {"cache", "shared"}

    with torch.inference_mode(), set_forward_context(_no_cache_ctx(model)):
        for n in (1, 2, 7, 40):
            ids, pos = _inputs(n, seed=n)
            expected = model.compute_logits(model(ids, pos))
            for compiled in (first, second):
                logits = model.compute_logits(compiled(ids, pos))
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
                assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_padding_to_a_capture_size_keeps_outputs(tiny_folder, tmp_path):
    model = _model(tiny_folder)
    cfg = _config(tiny_folder, tmp_path, capture_sizes=[4, 8])
    compiled = compile_model(model, cfg, torch.device("cpu"), attention_layers(model), backend="eager")
    assert compiled.strategy.capture_sizes == (4, 8)
    with torch.inference_mode(), set_forward_context(_no_cache_ctx(model)):
        for n in (1, 3, 4, 5, 9):
            ids, pos = _inputs(n, seed=10 + n)
            out = compiled(ids, pos)
            assert out.shape[0] == n
            torch.testing.assert_close(out, model(ids, pos), rtol=1e-5, atol=1e-5)


def test_a_piece_inductor_cannot_compile_runs_eagerly(tiny_folder, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch._inductor, "standalone_compile", fail)
    model = _model(tiny_folder)
    compiled = compile_model(model, _config(tiny_folder, tmp_path), torch.device("cpu"), attention_layers(model))
    assert {p.source for p in compiled.split.pieces} == {"eager-fallback"}
    with torch.inference_mode(), set_forward_context(_no_cache_ctx(model)):
        ids, pos = _inputs(6, seed=6)
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos))


def test_an_unreadable_cache_entry_is_a_miss_and_is_removed(tmp_path):
    cache = CompileCache(tmp_path)
    cache.directory.mkdir(parents=True, exist_ok=True)
    cache.path("abc").write_bytes(b"torn write")
    assert cache.load("abc") is None
    assert (cache.hits, cache.misses) == (0, 1)
    assert not cache.path("abc").exists()


class ReplayOps:
    """A CUDA-graph stand-in on the CPU: replay re-runs the captured call on the inputs seen
    at capture and writes into the outputs returned then, like a graph's fixed addresses.
    An input the strategy forgot to copy in is stale, and the outputs come out wrong."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def begin(self) -> None:
        pass

    def capture(self, fn):
        self.captures += 1
        outputs = fn()
        return (fn, outputs), outputs

    def replay(self, graph) -> None:
        self.replays += 1
        fn, outputs = graph
        for static, fresh in zip(outputs, fn()):
            if isinstance(static, torch.Tensor):
                static.copy_(fresh)


def test_cuda_graph_strategy_replays_captured_sizes_with_new_inputs(tiny_folder, tmp_path):
    model = _model(tiny_folder)
    ops = ReplayOps()
    strategy = CudaGraphStrategy([2, 4], torch.device("cpu"), ops=ops)
    compiled = compile_model(model, _config(tiny_folder, tmp_path), torch.device("cpu"), attention_layers(model),
                             strategy=strategy, backend="eager")
    pieces = compiled.num_pieces
    with torch.inference_mode(), set_forward_context(_no_cache_ctx(model)):
        with strategy.capturing():
            for size in (4, 2):
                compiled(*_inputs(size, seed=0))
        assert ops.captures == strategy.num_graphs == 2 * pieces
        ops.replays = 0
        for n, replayed in ((1, True), (2, True), (3, True), (4, True), (5, False)):
            before = ops.replays
            ids, pos = _inputs(n, seed=100 + n)
            pos = pos + 7  # other positions than at capture
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos), rtol=1e-5, atol=1e-5)
            assert ops.replays - before == (pieces if replayed else 0)
    assert ops.captures == 2 * pieces  # nothing is captured outside capturing()


def test_graph_piece_copies_an_input_whose_address_changed_before_replay():
    strategy = CudaGraphStrategy([4], torch.device("cpu"), ops=ReplayOps())
    piece = strategy.wrap_piece(0, lambda x, w: (x * w + 1,))
    w = torch.full((4,), 2.0)
    strategy.begin_step(4)
    with strategy.capturing():
        piece(torch.ones(4), w)
    (out,) = piece(torch.arange(4.0), w)  # a new tensor: its values must reach the graph
    assert out.tolist() == [1.0, 3.0, 5.0, 7.0]
    strategy.begin_step(3)  # not a capture size: runs the piece itself
    assert piece(torch.ones(3), w[:3])[0].tolist() == [3.0, 3.0, 3.0]


def test_dropped_graphs_are_captured_again_over_moved_weights():
    """After a wake-up the weights live elsewhere and a graph would still read the old
    memory, so the worker drops the graphs: the next capturing pass records them again
    (without the drop it only replays the stale ones)."""
    ops = ReplayOps()
    strategy = CudaGraphStrategy([4], torch.device("cpu"), ops=ops)
    piece = strategy.wrap_piece(0, lambda x: (x * 2,))
    strategy.begin_step(4)
    for _ in range(2):
        with strategy.capturing():
            piece(torch.ones(4))
    assert ops.captures == 1 and strategy.num_graphs == 1
    strategy.drop_graphs()
    assert strategy.num_graphs == 0
    assert piece(torch.ones(4))[0].tolist() == [2.0] * 4  # no graph: the piece itself runs
    with strategy.capturing():
        piece(torch.ones(4))
    assert ops.captures == 2 and strategy.num_graphs == 1


def test_graph_strategy_in_the_engine_pads_replays_and_matches_eager(tiny_models, make_llm, monkeypatch, tmp_path):
    """The CUDA strategy end to end on the CPU (ReplayOps standing in for CUDA graphs): the
    runner's warm-up captures every size, then real steps pad, replay with the paged
    attention in between, and give the eager engine's tokens."""
    import piston.torch_runner.model_runner as model_runner
    from piston_cpu.worker import CpuWorker

    ops = ReplayOps()
    strategies = []

    def compile_with_graphs(model, config, device, layers, strategy=None, platform_default="eager"):
        strategies.append(CudaGraphStrategy([1, 2, 4, 8], device, ops=ops))
        return compile_model(model, config, device, layers, strategies[-1], platform_default, backend="eager")

    path = tiny_models("llama")
    kwargs = dict(max_model_len=256, kv_cache_memory="32MiB", seed=0, dtype="float32")
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hi", "Water boils at"]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    eager = make_llm(path, compilation_mode="eager", **kwargs).generate(prompts, params, use_tqdm=False)

    monkeypatch.setenv("PISTON_ENGINE_IN_PROCESS", "1")  # the patches below must reach the worker
    monkeypatch.setattr(model_runner, "compile_model", compile_with_graphs)
    monkeypatch.setattr(CpuWorker, "warm_up", lambda self: self.runner.capture_model(), raising=False)
    llm = make_llm(path, compilation_mode="piecewise", compilation_cache_dir=str(tmp_path), **kwargs)
    pieces = len(strategies[0].pieces)
    assert pieces == 3 + 1  # the tiny "llama" has 3 layers
    assert ops.captures == strategies[0].num_graphs == 4 * pieces
    graphs = llm.generate(prompts, params, use_tqdm=False)
    assert ops.replays > 0 and ops.captures == 4 * pieces
    assert [o.outputs[0].token_ids for o in graphs] == [o.outputs[0].token_ids for o in eager]
