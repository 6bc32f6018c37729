"""Speed levers must not change what is computed: the chunked loss against the plain one, the lever
decisions, and the benchmark's own measuring pieces (same tokens on both sides, FLOPs, warm-up)."""

from __future__ import annotations

import pytest

from conftest import DATASETS

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs


@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_cross_entropy_equals_plain(monkeypatch, weight_grad):
    import torch

    from contract import decisions
    from trainer import chunked_loss

    monkeypatch.setattr(decisions, "_CHUNK_ELEMENTS", 3000 * 70)  # 70-row chunks: 5 chunks, the last partial
    torch.manual_seed(0)
    hidden = torch.randn(300, 48, requires_grad=True)
    weight = (0.3 * torch.randn(3000, 48)).requires_grad_(weight_grad)
    targets = torch.randint(0, 3000, (300,))

    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    plain_grads = torch.autograd.grad(plain, [hidden, weight] if weight_grad else [hidden])
    chunked = chunked_loss.linear_cross_entropy(hidden, weight, targets)
    chunked_grads = torch.autograd.grad(3 * chunked, [hidden, weight] if weight_grad else [hidden])

    assert chunked.item() == pytest.approx(plain.item(), abs=1e-5)
    for ours, theirs in zip(chunked_grads, plain_grads):
        assert torch.allclose(ours / 3, theirs, atol=1e-6)


def _lora_tiny(dtype=None, wide_heads=False):
    """The GQA tiny builtin (4 query heads of 32 over 2 KV heads) with LoRA on q and v; `wide_heads`: the
    same weights read as 2 query heads of 64 over 1 KV head (the width our flash kernel takes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.models.builtin import builtin_path

    torch.manual_seed(0)
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64} if wide_heads else {}
    model = AutoModelForCausalLM.from_pretrained(builtin_path("builtin:tiny-llama-bpe"), dtype=dtype or torch.float32,
                                                 **heads)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _packed_medical_batch(tok, packed=True, block_mask=True):
    """Five medical rows: packed 3 + 2 in two sequences, or one per sequence (padded to the longest) with
    the block mask (as on CPU under our attention kernels) or the (rows, length) padding mask."""
    from trainer.data.batching import collate
    from inputs.data.records import read_dataset
    from trainer.data.tokenize import ConversationEncoder, choose_template

    template, _ = choose_template("auto", tok)
    rows, _ = ConversationEncoder(tok, template, 256, False, "truncate").encode_all(
        read_dataset(DATASETS / "medical_qa.jsonl")[:5])
    if packed:
        return collate([[rows[0], rows[1], rows[2]], [rows[3], rows[4]]], tok.pad_token_id, block_mask=True)
    return collate([[r] for r in rows], tok.pad_token_id, block_mask=block_mask)


def test_chunked_loss_equals_the_models_own_loss_on_a_packed_batch(tokenizers):
    import torch

    from trainer.loop import _forward

    batch = _packed_medical_batch(tokenizers["tiny-llama-bpe"])
    model = _lora_tiny()
    trainable = [p for p in model.parameters() if p.requires_grad]

    own = _forward(model, batch, "cpu", "fp32", chunked_loss=False).loss
    own_grads = torch.autograd.grad(own, trainable)
    chunked = _forward(model, batch, "cpu", "fp32", chunked_loss=True).loss
    chunked_grads = torch.autograd.grad(chunked, trainable)

    assert chunked.item() == pytest.approx(own.item(), abs=1e-5)
    for ours, theirs in zip(chunked_grads, own_grads):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_chunked_loss_under_bf16_autocast_stays_close_to_the_models_own(tokenizers):
    import torch

    from trainer.data.batching import collate
    from trainer.loop import _forward

    tok = tokenizers["tiny-llama-bpe"]
    ids = tok("The patient reported a mild headache after the first dose.")["input_ids"]
    batch = collate([[(ids, ids)]], tok.pad_token_id, block_mask=False)
    model = _lora_tiny(torch.bfloat16)
    with torch.no_grad():
        own = _forward(model, batch, "cpu", "bf16", chunked_loss=False).loss.item()
        chunked = _forward(model, batch, "cpu", "bf16", chunked_loss=True).loss.item()
    assert chunked == pytest.approx(own, rel=1e-2)


def _use_kernel(model, kernel: str) -> None:
    """Switch the model to one of our attention kernels; "segments" / "flash": the blockwise kernel with
    every packed batch sent one sequence at a time through torch's causal kernel / our flash kernel
    (trainer/attention_segments.py; the segments_reset fixture resets both)."""
    from contract.decisions import Decision
    from trainer import attention_segments
    from trainer.performance import use_attention

    per_sequence = kernel in ("segments", "flash")
    use_attention(model, Decision("blockwise" if per_sequence else kernel, "test"))
    attention_segments.use_from(1 if per_sequence else None)
    if kernel == "flash":
        from trainer import flash_kernel
        from trainer.performance import cpp_compiler

        attention_segments.use_flash_kernel(flash_kernel.load(cpp_compiler()))


@pytest.fixture
def segments_reset():
    from trainer import attention_segments

    yield
    attention_segments.use_from(None)
    attention_segments.use_flash_kernel(None)


@pytest.mark.parametrize("kernel", ["grouped-matmul", "blockwise", "segments", "flash"])
@pytest.mark.parametrize("packed", [True, False])
def test_packed_attention_equals_sdpa(tokenizers, kernel, packed, segments_reset, monkeypatch):
    """Our attention kernels give sdpa's logits and LoRA gradients, on the GQA tiny builtin (4 query heads
    over 2 KV heads; for our flash kernel, 2 heads of 64 over 1): packed batches against sdpa under the
    same mask, and unpacked ones (padded rows of 5 lengths, under the block mask) against sdpa under the
    padding mask, which is what the model does on its own."""
    import torch

    from trainer import attention
    from trainer.loop import _forward

    batch = _packed_medical_batch(tokenizers["tiny-llama-bpe"], packed)
    reference = batch if packed else _packed_medical_batch(tokenizers["tiny-llama-bpe"], packed, block_mask=False)
    assert batch.attention_mask.dim() == 4 and reference.attention_mask.dim() == (4 if packed else 2)
    if kernel in ("segments", "flash"):  # the batch does go through a kernel per sequence
        from trainer import attention_segments

        assert attention_segments.spans_of(batch.attention_mask) is not None
        if kernel == "flash":  # ours, not torch's behind it
            monkeypatch.setattr(attention_segments, "torch_attention", lambda *a: pytest.fail("torch's kernel ran"))
    model = _lora_tiny(wide_heads=kernel == "flash")
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for impl, inputs in (("sdpa", reference), (kernel, batch)):
        if impl == kernel:
            _use_kernel(model, kernel)
            assert attention.kernel_of(model.get_base_model().config._attn_implementation) in (kernel, "blockwise")
        out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids)
        loss = _forward(model, inputs, "cpu", "fp32", chunked_loss=True).loss
        results[impl] = (out.logits.detach(), loss.item(), torch.autograd.grad(loss, trainable))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results.values()
    real = batch.labels != -100
    assert torch.allclose(logits_a[real], logits_b[real], atol=1e-5), (logits_a[real] - logits_b[real]).abs().max()
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for ours, theirs in zip(grads_b, grads_a):
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["grouped-matmul", "blockwise"])
def test_evaluation_packs_rows_with_the_loss_of_padded_rows(tokenizers, kernel, monkeypatch):
    """evaluate_loss with pack_to (what a job whose batches carry the block mask evaluates with): eight
    medical rows end to end in sequences of up to 512 tokens through our kernel, the same mean loss per
    target token as one row per sequence padded under sdpa's padding mask."""
    from inputs.data.records import read_dataset
    from trainer import loop
    from trainer.data.tokenize import ConversationEncoder, choose_template

    tok = tokenizers["tiny-llama-bpe"]
    template, _ = choose_template("auto", tok)
    rows, _ = ConversationEncoder(tok, template, 128, False, "truncate").encode_all(
        read_dataset(DATASETS / "medical_qa.jsonl")[:8])
    model = _lora_tiny()
    padded = loop.evaluate_loss(model, rows, 4, tok.pad_token_id, "cpu", "fp32")
    _use_kernel(model, kernel)
    shapes, collate = [], loop.collate
    monkeypatch.setattr(loop, "collate", lambda seqs, *a: shapes.append([len(s) for s in seqs]) or collate(seqs, *a))
    packed = loop.evaluate_loss(model, rows, 4, tok.pad_token_id, "cpu", "fp32", pack_to=512)
    assert sum(map(len, shapes)) < len(rows) and max(max(s) for s in shapes) > 1  # rows did share sequences
    assert sum(map(sum, shapes)) == len(rows)
    assert packed == pytest.approx(padded, rel=1e-5)


@pytest.mark.parametrize("kernel", ["grouped-matmul", "blockwise", "segments", "flash"])
def test_packed_attention_under_bf16_autocast(tokenizers, kernel, segments_reset):
    import torch

    from trainer.loop import _forward

    batch = _packed_medical_batch(tokenizers["tiny-llama-bpe"])
    model = _lora_tiny(torch.bfloat16, wide_heads=kernel == "flash")
    trainable = [p for p in model.parameters() if p.requires_grad]
    sdpa = _forward(model, batch, "cpu", "bf16", chunked_loss=True).loss
    sdpa_grads = torch.autograd.grad(sdpa, trainable)
    _use_kernel(model, kernel)
    ours = _forward(model, batch, "cpu", "bf16", chunked_loss=True).loss
    our_grads = torch.autograd.grad(ours, trainable)
    assert ours.item() == pytest.approx(sdpa.item(), rel=2e-3)
    for a, b in zip(our_grads, sdpa_grads):
        assert (a - b).norm() <= 0.05 * b.norm()


def test_chunked_loss_with_bf16_logits_and_gradients():
    """The bf16 path (softmax in the compute dtype, loss from the rounded target probabilities) against
    float32 cross-entropy of the same bf16 logits."""
    import torch

    from trainer import chunked_loss

    torch.manual_seed(0)
    hidden = torch.randn(300, 48, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.3 * torch.randn(3000, 48)).to(torch.bfloat16)
    targets = torch.randint(0, 3000, (300,))
    plain = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets)
    (plain_grad,) = torch.autograd.grad(plain, [hidden])
    chunked = chunked_loss.linear_cross_entropy(hidden, weight, targets)
    (chunked_grad,) = torch.autograd.grad(chunked, [hidden])
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-3)
    assert chunked_grad.dtype == torch.bfloat16
    assert (chunked_grad.float() - plain_grad.float()).norm() <= 0.01 * plain_grad.float().norm()


def test_chunked_loss_gives_a_trained_fp32_weight_its_float32_gradient_under_autocast(monkeypatch):
    """Full fine-tuning under bf16 autocast: the output layer's fp32 weight (with tied embeddings the
    model's largest matrix) gets a float32 gradient summed over chunks in float32, close to float32
    cross-entropy's, for both the SFT loss and the preference log-probs."""
    import torch

    from contract import decisions
    from trainer import chunked_loss

    monkeypatch.setattr(decisions, "_CHUNK_ELEMENTS", 3000 * 70)  # 5 chunks
    torch.manual_seed(0)
    hidden = torch.randn(300, 48, requires_grad=True)
    weight = (0.3 * torch.randn(3000, 48)).requires_grad_()
    targets = torch.randint(0, 3000, (300,))
    (reference,) = torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ weight.t(), targets), [weight])
    log_probs = torch.log_softmax(hidden @ weight.t(), -1)[torch.arange(300), targets]
    (reference_lp,) = torch.autograd.grad(log_probs.sum(), [weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ours,) = torch.autograd.grad(chunked_loss.linear_cross_entropy(hidden, weight, targets), [weight])
        (ours_lp,) = torch.autograd.grad(chunked_loss.linear_log_probs(hidden, weight, targets).sum(), [weight])
    for got, want in ((ours, reference), (ours_lp, reference_lp)):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.02 * want.norm()


def test_lever_decisions():
    from types import SimpleNamespace

    from contract.decisions import choose_base_dtype
    from contract.decisions import block_mask, choose_attention
    from trainer.performance import choose_adapter_inputs, choose_chunked_loss

    bench = SimpleNamespace(_attn_implementation="sdpa", num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, hidden_size=576)
    decision = choose_attention("cpu", bench, 5, 256, "bf16")
    # q, k, v ((9 + 2 x 3) x 64 per token) and the probabilities (9 heads x 256 x 5/8 at 4 query blocks),
    # 30 layers x 5 x 256 tokens x 2 bytes
    assert decision.value == "grouped-matmul" and "176 MB" in decision.reason
    longer = choose_attention("cpu", bench, 4, 1024, "bf16")
    assert longer.value == "blockwise" and "225 MB" in longer.reason  # q, k and v only: linear in the length
    assert choose_attention("cuda", bench, 5, 256, "bf16").value == "sdpa"
    assert block_mask(False, decision.value) and block_mask(True, "sdpa") and not block_mask(False, "sdpa")
    flash = SimpleNamespace(**{**vars(bench), "_attn_implementation": "flash_attention_2"})
    assert choose_attention("cpu", flash, 5, 256, "bf16").value == "flash_attention_2"
    assert choose_adapter_inputs("lora", "bf16").value == "as-is"
    assert choose_adapter_inputs("lora", "fp32").value == "cast"
    assert choose_adapter_inputs("full", "bf16").value == "cast"

    assert choose_base_dtype("lora", "bf16").value == "bf16"
    assert choose_base_dtype("qlora", "fp16").value == "fp16"
    assert choose_base_dtype("lora", "fp32").value == "fp32"
    assert choose_base_dtype("full", "bf16").value == "fp32"  # trained weights never drop to bf16

    llama = _lora_tiny()
    assert choose_chunked_loss(llama).value == "on"
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    decision = choose_chunked_loss(gpt2)
    assert decision.value == "off" and "gpt2" in decision.reason


def _bench_tokenizer(model: str):
    """The tokenizer bench/model.py's BENCH_MODELS model trains with (the real one from the builtin cache)."""
    from transformers import AutoTokenizer

    from bench.model import REAL_MODEL, shaped_tokenizer
    from trainer.models.builtin import builtin_path

    return AutoTokenizer.from_pretrained(builtin_path(REAL_MODEL)) if model == "real" else shaped_tokenizer()


@pytest.mark.parametrize("model", ["shape", pytest.param("real", marks=pytest.mark.slow)])
def test_benchmark_feeds_both_sides_the_same_sequences(model):
    """The baseline tokenizes `text + eos` itself, one row per sequence; the project, with the text settings
    of bench/strategy.yaml, must build the same sequences of the same ids (plain text's default, blocks,
    joins the rows and cuts across them: the two sides' held-out losses would then not compare), with
    either benchmark model's tokenizer (the real SmolLM2's adds no BOS and ends rows with <|im_end|>)."""
    from types import SimpleNamespace

    import yaml

    from bench.cpu_lora import ROOT
    from bench.model import MAX_TOKENS, MIN_TOKENS, make_rows
    from trainer.data.tokenize import ConversationEncoder, choose_template

    tok = _bench_tokenizer(model)
    rows = make_rows(tok, 3000, seed=1)
    dataset = yaml.safe_load((ROOT / "bench" / "strategy.yaml").read_text())["bench_cpu_lora"]["fine_tuner"]["config"]["dataset"]
    encoder = ConversationEncoder(tok, choose_template("auto", tok)[0], 256, False, "truncate", dataset["text_mode"])
    sequences, _ = encoder.encode_all([SimpleNamespace(text=row["text"], messages=None, tools=()) for row in rows])
    assert [ids for ids, _ in sequences] == [tok(row["text"] + tok.eos_token, truncation=True, max_length=256)["input_ids"]
                                             for row in rows]
    assert all(MIN_TOKENS <= len(ids) <= MAX_TOKENS for ids, _ in sequences)


def test_benchmark_measures():
    from bench.measure import WARMUP_STEPS, after_warmup, lora_flops
    from bench.model import SHAPE

    seconds = [9.0] * WARMUP_STEPS + [1.0, 2.0]
    assert after_warmup(seconds, [5] * WARMUP_STEPS + [100, 200]) == (100.0, 300, 3.0)
    # SmolLM2-135M's 134,515,008 parameters less its 35,136 norm weights are matmul weights (the tied
    # embedding counted once, as the output layer); one token attends to one key.
    assert lora_flops(SHAPE, [1]) == pytest.approx(4 * (134_515_008 - 35_136) + 12 * 576 * 30, rel=1e-9)


def test_ceiling_counts_the_products_an_exact_step_needs():
    """bench.ceiling's products: every matmul FLOP bench.measure.lora_flops counts but the attention's,
    less the first layer's q, k, v input gradients where the embedding is frozen; chunks over 4096 tokens."""
    from bench.ceiling import flops, products
    from bench.measure import attention_flops, lora_flops
    from bench.model import SHAPE

    first_qkv = 2 * (576 * 576 + 2 * 576 * 192)  # FLOPs per token of the first layer's q, k, v input gradients
    for tokens in (1024, 16384):
        lora, full = flops(products(SHAPE, tokens, "lora-qv-r8")), flops(products(SHAPE, tokens, "full"))
        assert lora == 4 * (134_515_008 - 35_136) * tokens - first_qkv * tokens
        assert full == 6 * (134_515_008 - 35_136) * tokens
        assert flops(products(SHAPE, tokens, "lora-all-r16")) == lora
    assert max(m for _, m, _, _, _ in products(SHAPE, 16384, "lora-qv-r8")) == 4096
    assert max(k for _, _, k, _, _ in products(SHAPE, 16384, "full")) == 49152  # the output layer's input gradient
    lengths = [100, 1000]
    assert attention_flops(SHAPE, lengths) == lora_flops(SHAPE, lengths) - 4 * (134_515_008 - 35_136) * 1100


def test_matrix_times_at_least_eight_rows_per_side():
    """Batch 1 times 8 steps (one row each for the baseline), larger batches the default 3 or --steps."""
    from bench.matrix import timed_steps

    assert [timed_steps(cell, 3) for cell in ("2048x1:full", "512x4:lora-qv-r8", "256x8:full")] == [8, 3, 3]
    assert timed_steps("1024x1:lora-all-r16", 12) == 12 and timed_steps("512x4:full", 5) == 5


def test_matrix_cell_strategies_are_valid_packed_and_unpacked(tmp_path):
    """The strategy a cell writes parses, with the cell's settings; --unpacked turns packing off only,
    --precision sets the precision only."""
    import yaml

    from bench.matrix import write_strategy
    from contract.strategy import parse_strategy

    for packed in (True, False):
        folder = tmp_path / str(packed)
        folder.mkdir()
        text = yaml.safe_load(write_strategy(folder, 512, 4, "lora-all-r16-gc", 5, packed).read_text())
        cfg = parse_strategy("bench_matrix", text["bench_matrix"]).cfg
        assert (cfg.training_args.max_seq_length, cfg.training_args.per_device_train_batch_size) == (512, 4)
        assert cfg.training_args.gradient_checkpointing and cfg.method.r == 16
        assert cfg.dataset.packing == ("auto" if packed else False)
        assert cfg.training_args.precision == "auto"
    # --precision fp32: llamafarm's side runs the precision the baseline is given, not its own decision.
    folder = tmp_path / "fp32"
    folder.mkdir()
    text = yaml.safe_load(write_strategy(folder, 512, 4, "full", 5, precision="fp32").read_text())
    assert parse_strategy("bench_matrix", text["bench_matrix"]).cfg.training_args.precision == "fp32"


def test_matrix_rounds_alternate_the_sides_and_pool_their_timed_steps():
    from bench.matrix import alternation, pooled

    assert alternation(1) == ["baseline", "local"]
    assert alternation(3) == ["baseline", "local", "local", "baseline", "baseline", "local"]
    # Every runner takes part in every round, so the runner comparison is alternated too.
    assert alternation(2, ("local", "container")) == ["baseline", "local", "container", "container", "local", "baseline"]
    first = {"tokens_per_second": 100.0, "timed_tokens": 300, "timed_seconds": 3.0, "peak_rss_mb": 900.0,
             "eval_loss": 9.5, "decisions": {"precision": "bf16"}}
    second = {**first, "tokens_per_second": 300.0, "timed_tokens": 900, "timed_seconds": 3.0, "peak_rss_mb": 950.0,
              "eval_loss": 9.6}
    both = pooled([first, second])
    assert both["tokens_per_second"] == 200.0 and (both["timed_tokens"], both["timed_seconds"]) == (1200, 6.0)
    assert (both["peak_rss_mb"], both["eval_loss"], both["runs"]) == (950.0, 9.5, [100.0, 300.0])
    assert pooled([first]) is first
    killed = {"failed": "command failed (-9)", "tokens_per_second": None}
    assert pooled([first, killed]) is killed, "a run that did not finish leaves the side without a figure"


def test_matrix_says_why_a_side_failed_in_the_commands_own_words(tmp_path):
    """A side that stops names its cause by the log's last line (the engine's own message), not by its
    command line; a failure with an empty log keeps the command line. Real commands that fail."""
    import sys

    from bench.cpu_lora import CommandFailed, _run

    said = ("Error: no container engine answers at unix:///run/podman/podman.sock (default socket): ConnectionError: "
            "('Connection aborted.', ConnectionRefusedError(111, 'Connection refused')); start Docker, or Podman's API "
            "service (`bash scripts/container_setup.sh` sets one up on Debian), or set DOCKER_HOST; or run the job "
            "with --runner local")

    def cause(script: str) -> str:
        with pytest.raises(CommandFailed) as failed:
            _run([sys.executable, "-c", script], log=tmp_path / "side.log")
        assert isinstance(failed.value, SystemExit), "a bench that does not catch it still stops with the message"
        return failed.value.cause

    assert cause(f"print('Starting the job'); print({said!r}); print(); raise SystemExit(1)") == (
        f"command failed (1): {said}"), "the engine's whole message, its advice too"
    assert cause("raise SystemExit(3)") == f"command failed (3): {sys.executable} -c raise SystemExit(3)"
    assert len(cause("print('y' * 900); raise SystemExit(2)")) == len("command failed (2): ") + 400
    # A progress bar rewrites its line with carriage returns: its last state is the line.
    assert cause(r"import sys; sys.stdout.write('loading\n 40%|##  | 4/10\r 50%|### | 5/10\n\n'); "
                 "raise SystemExit(9)") == "command failed (9): 50%|### | 5/10"


def test_matrix_table_keeps_a_cell_whose_side_failed():
    """A padded baseline that runs out of memory (2048 x 4 does on 24 GB), or our side killed the same
    way, leaves its cell without a ratio; the matrix goes on and says so instead of dying."""
    from bench.cpu_lora import CommandFailed
    from bench.matrix import _side_or_failure, table

    def killed():
        raise CommandFailed(["python", "-m", "bench.baseline"], -9, "loading\n 40%|##  | 4/10")

    failed = _side_or_failure("2048x8:full", "the baseline", killed)
    assert failed == {"failed": "command failed (-9): 40%|##  | 4/10", "tokens_per_second": None,
                      "peak_rss_mb": None, "eval_loss": None, "decisions": {}}

    decisions = {"precision": "bf16", "attention": "blockwise", "compile": "off", "lora_dropout": "fast-mask"}
    ours = {"tokens_per_second": 600.0, "peak_rss_mb": 2000.0, "eval_loss": 10.0123}
    results = [
        {"length": 512, "batch": 4, "method": "full", "flops_per_token": 1e9, "ratio": 2.0, "decisions": decisions,
         "baseline": {"tokens_per_second": 300.0, "peak_rss_mb": 4000.0, "eval_loss": 10.1}, "project": ours},
        {"length": 2048, "batch": 4, "method": "lora-all-r16", "flops_per_token": 1e9, "ratio": None,
         "decisions": decisions, "baseline": {"failed": "command failed (-9)", "tokens_per_second": None,
                                              "peak_rss_mb": None, "eval_loss": None}, "project": ours},
    ]
    results.append({"length": 2048, "batch": 8, "method": "lora-all-r16", "flops_per_token": 1e9, "ratio": None,
                    "decisions": {k: None for k in decisions}, "baseline": results[1]["baseline"], "project": failed})
    results.append({**results[0], "ratio": None, "decisions": {k: None for k in decisions}, "project": failed})
    rows = table(results, peak=1000.0).splitlines()[2:]
    assert rows[0] == ("| 512 | 4 | full | 300 | 600 | 2.00x | 4,000 / 2,000 | 30% / 60% | 10.100 / 10.012 | bf16, "
                       "blockwise, compile off, dropout fast-mask |")
    assert rows[1].startswith("| 2048 | 4 | lora-all-r16 | - | 600 | baseline failed | - / 2,000 | -% / 60% | "
                              "- / 10.012 |")
    assert rows[2] == "| 2048 | 8 | lora-all-r16 | - | - | baseline and llamafarm failed | - / - | -% / -% | - / - | - |"
    assert rows[3] == "| 512 | 4 | full | 300 | - | llamafarm failed | 4,000 / - | 30% / -% | 10.100 / - | - |"


def test_matrix_picture_colours_each_cell_by_the_targets(tmp_path):
    """matrix.png: one square per cell, its colour the band its ratio falls in (under the 1.5x floor,
    under 2x, 2x or more; grey where a side did not finish), its text the ratio and both speeds."""
    import json

    from bench.matrix_plot import BANDS, FAILED, colour, label, main

    def cell(length, batch, method, base, ours):
        return {"length": length, "batch": batch, "method": method,
                "ratio": ours / base if base and ours else None,
                "baseline": {"tokens_per_second": base, **({} if base else {"failed": "command failed (-9)"})},
                "project": {"tokens_per_second": ours, **({} if ours else {"failed": "command failed (-9)"})}}

    results = [cell(256, 1, "lora-qv-r8", 400.0, 560.0), cell(256, 1, "full", 300.0, 510.0),
               cell(2048, 8, "lora-qv-r8", None, 575.0), cell(2048, 8, "full", None, None)]
    assert [colour(r["ratio"]) for r in results] == [BANDS[0][1], BANDS[1][1], FAILED, FAILED]
    assert colour(2.0) == BANDS[2][1]
    assert [label(r) for r in results] == ["1.40x\n400 / 560", "1.70x\n300 / 510",
                                           "baseline\ndid not finish\nours 575",
                                           "baseline and llamafarm\ndid not finish"]
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps({"machine": "a test", "peaks": {"bf16": 900.0}, "results": results}))
    assert main([str(saved)]) == 0
    assert (tmp_path / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="cannot read the matrix result .*pass a result.json that bench.matrix wrote"):
        main([str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="cannot write the plot to .*matrix.txt: unknown image type '.txt'"):
        main([str(saved), "--out", str(tmp_path / "matrix.txt")])


def test_threads_go_to_one_only_when_the_cores_stay_busy(monkeypatch):
    """One thread (half the speed on two cores) only when every check finds the cores busy: a probe
    that catches a passing burst is checked again, and a later calm check keeps every core."""
    import torch

    from trainer import performance

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(performance.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(performance, "BUSY_RECHECK_SECONDS", 0)

    def probe_busy_for(checks: int):
        calls = []  # each check: a warm-up call per count, then 5 interleaved samples per count

        def probe(threads: int) -> float:
            busy = len(calls) // 12 < checks
            calls.append(threads)
            return (0.036 if threads == 2 else 0.008) if busy else (0.004 if threads == 2 else 0.006)
        return probe

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(performance, "_probe_seconds", probe_busy_for(1))
        calm = performance.choose_threads()
        assert (calm.value, calm.reason) == ("2", "one per core this process may use (probe: 4 ms with 2 threads, "
                                                  "6 ms with 1)")
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(performance, "_probe_seconds", probe_busy_for(performance.BUSY_CHECKS))
        busy = performance.choose_threads()
        assert busy.value == "1" and torch.get_num_threads() == 1
        assert busy.reason == ("the 2 cores are busy: a step-like probe took longer with 2 threads than with 1 in "
                               "each of 3 checks 0 s apart (36 against 8 ms; 36 against 8 ms; 36 against 8 ms)")
    finally:
        torch.set_num_threads(before)


def test_compile_decision(monkeypatch):
    """auto compiles by the gain measured on this machine: measured by a long enough run when missing,
    on when the cached gain repays the compile within the run, off when it does not or there is none."""
    from contract.errors import UserError
    from trainer import performance
    from trainer.compile_probe import MEASURE_AFTER_SECONDS, decide
    from trainer.performance import choose_compile

    long = 2 * MEASURE_AFTER_SECONDS
    monkeypatch.setattr(performance, "cpp_compiler", lambda: "/usr/bin/g++")
    assert choose_compile("auto", "cpu", long, False, False).value == "measure"
    short = choose_compile("auto", "cpu", MEASURE_AFTER_SECONDS / 2, False, False)
    assert short.value == "off" and "not measured on this machine" in short.reason
    pays = {"gain": 0.10, "compile_seconds": 30.0, "compiled_seconds": 1.0, "eager_seconds": 1.1}  # repaid after 300 s
    assert choose_compile("auto", "cpu", 400, False, False, pays).value == "on"
    too_short = choose_compile("auto", "cpu", 200, False, False, pays)
    assert too_short.value == "off" and "~300 s" in too_short.reason and "(cached)" in too_short.reason
    slower = {**pays, "gain": -0.03, "compiled_seconds": 1.03, "eager_seconds": 1.0}
    assert choose_compile("auto", "cpu", 100 * long, False, False, slower).value == "off"
    # Measured just now: the compile is paid, so any real gain keeps it, and none undoes it.
    assert decide({**pays, "gain": 0.03}, 10.0, compiled_already=True).value == "on"
    assert decide(slower, 100 * long, compiled_already=True).value == "off"
    assert choose_compile("auto", "cpu", None, False, False).value == "off"
    assert choose_compile("auto", "cpu", long, True, False, pays).value == "off"  # distributed
    assert choose_compile("auto", "cpu", long, False, True, pays).value == "off"  # gradient checkpointing
    assert choose_compile("auto", "cuda", long, False, False, pays).value == "off"
    assert choose_compile(True, "cpu", 1.0, False, False, slower).value == "on"
    assert choose_compile(True, "cuda", None, False, False).value == "on"
    assert choose_compile(False, "cpu", long, False, False, pays).value == "off"
    monkeypatch.setattr(performance, "cpp_compiler", lambda: None)
    missing = choose_compile("auto", "cpu", long, False, False, pays)
    assert missing.value == "off" and "C++ compiler" in missing.reason
    with pytest.raises(UserError, match="torch_compile: true needs a C.. compiler"):
        choose_compile(True, "cpu", long, False, False)  # asked for, cannot be honoured: refused
    assert choose_compile(True, "cuda", None, False, False).value == "on"  # the check is for CPU code only


def test_the_compile_probe_measures_once_and_leaves_training_untouched(tokenizers, tmp_path, monkeypatch):
    """measure() on the LoRA tiny builtin: eager and compiled step times kept in the machine cache under the
    step's key, no gradients left behind, torch's generator as it was; undo_compile gives eager layers back."""
    import torch

    from contract.decisions import Decision
    from trainer import compile_probe
    from trainer.loop import TokenObjective
    from trainer.performance import _decoder_layers, undo_compile, use_attention, use_compile

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path))
    monkeypatch.setattr("trainer.devices.core_wait_share", lambda before: 0.0)  # quiet, whatever this machine is
    tok = tokenizers["tiny-llama-bpe"]
    model = _lora_tiny(torch.bfloat16)
    use_attention(model, Decision("grouped-matmul", "test"))
    objective = TokenObjective(tok.pad_token_id, True, "cpu", "bf16", chunked_loss=True)
    batch = _packed_medical_batch(tok)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    key = compile_probe.step_key(model.config, trainable, "sft lora, bf16, test")
    assert compile_probe.cached_gain(key) is None
    use_compile(model, Decision("measure", "test"))
    rng = torch.get_rng_state()
    measured = compile_probe.measure(model, objective, batch, key)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert measured["eager_seconds"] > 0 and measured["compiled_seconds"] > 0 and measured["compile_seconds"] >= 0
    assert measured["gain"] > -1 and measured["batch"] == list(batch.input_ids.shape)
    assert compile_probe.cached_gain(key) == measured
    assert compile_probe.cached_gain(compile_probe.step_key(model.config, trainable, "sft lora, fp32, test")) is None
    compiled_loss = objective.loss(model, batch)[0].item()
    undo_compile(model)
    assert all(layer._compiled_call_impl is None for layer in _decoder_layers(model))
    assert objective.loss(model, batch)[0].item() == pytest.approx(compiled_loss, rel=5e-3)


@pytest.mark.parametrize("kernel", ["grouped-matmul", "blockwise", "segments", "flash"])
def test_compiled_layers_train_like_eager(tokenizers, kernel, segments_reset):
    """use_compile on the LoRA tiny builtin with our attention kernels (kept out of the compiled graph),
    under bf16 autocast: the same loss
    and adapter gradients as the same model run eagerly; a second batch width reuses the compiled
    graph (dynamic shapes), and the state-dict keys are unchanged."""
    import dataclasses

    import torch
    from torch._dynamo.utils import counters

    from contract.decisions import Decision
    from trainer.loop import _forward
    from trainer.performance import eager, use_compile

    wide = _packed_medical_batch(tokenizers["tiny-llama-bpe"])
    n = wide.input_ids.shape[1] - 7  # the same rows cut 7 positions short: another batch width
    narrow = dataclasses.replace(wide, input_ids=wide.input_ids[:, :n].contiguous(),
                                 labels=wide.labels[:, :n].contiguous(),
                                 position_ids=wide.position_ids[:, :n].contiguous(),
                                 attention_mask=wide.attention_mask[:, :, :n, :n].contiguous())
    batches = [wide, narrow]
    model = _lora_tiny(torch.bfloat16, wide_heads=kernel == "flash")
    keys = list(model.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    _use_kernel(model, kernel)
    use_compile(model, Decision("on", "test"))
    assert list(model.state_dict()) == keys
    torch._dynamo.reset()  # another test may have compiled the same layer code in this process
    graphs = [counters["stats"]["unique_graphs"]]  # the count is per process: other tests may compile too
    for batch in batches:
        results = []
        for mode in ("eager", "compiled"):
            with eager() if mode == "eager" else torch.enable_grad():
                loss = _forward(model, batch, "cpu", "bf16", chunked_loss=True).loss
                results.append((loss.item(), torch.autograd.grad(loss, trainable)))
        graphs.append(counters["stats"]["unique_graphs"])
        (loss_e, grads_e), (loss_c, grads_c) = results
        assert loss_c == pytest.approx(loss_e, rel=5e-3)
        for c, e in zip(grads_c, grads_e):
            assert (c - e).norm() <= 0.05 * e.norm()
    assert graphs[1] > graphs[0], "the first batch compiled the layers"
    assert graphs[2] == graphs[1], "the narrower batch compiled nothing new"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask", ["numpy", "kernel"])
def test_fast_lora_dropout_is_torchs_dropout_with_another_generator(dtype, mask):
    """Same keep rate, same scaled value in the input's dtype, gradient through the same mask, identity in
    eval, and the mask a function of torch's RNG state (so seeds and resume govern it): numpy's mask
    and our C++ kernel's (trainer/dropout_kernel.py) alike."""
    import torch

    from trainer import dropout_kernel
    from trainer.lora_dropout import FastDropout
    from trainer.performance import cpp_compiler

    dtype = getattr(torch, dtype)
    x = torch.ones(1000, 1000, dtype=dtype, requires_grad=True)
    dropout = FastDropout(0.1, dropout_kernel.load(cpp_compiler()) if mask == "kernel" else None)
    torch.manual_seed(7)
    y = dropout(x)
    kept_value = torch.nn.functional.dropout(torch.ones(100, dtype=dtype), 0.1, True).max()
    assert set(torch.unique(y).tolist()) == {0.0, kept_value.item()}
    # 1e6 draws: the dropped share's standard deviation is 3e-4, so 0.1 +- 2e-3 is over six of them.
    assert abs((y == 0).float().mean().item() - 0.1) < 2e-3
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y.detach()), "the gradient passes through the same mask, scaled alike"
    torch.manual_seed(7)
    assert torch.equal(dropout(x), y), "same torch seed, same mask"
    assert not torch.equal(dropout(x), y), "the next call draws a new mask"
    assert dropout.eval()(x) is x


def test_fast_lora_dropout_inside_a_compiled_layer_is_torchs_own():
    """Traced by torch.compile, FastDropout hands the mask to torch's dropout (inductor draws it in its
    fused kernel; numpy cannot be traced): the same result as torch's dropout from the same seed."""
    import torch

    from trainer.lora_dropout import FastDropout

    x = torch.randn(64, 32)
    compiled = torch.compile(FastDropout(0.3), backend="eager", fullgraph=True)  # fullgraph: no numpy fallback
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    assert torch.equal(y, torch.nn.functional.dropout(x, 0.3, True))


def test_lora_dropout_and_optimizer_decisions(monkeypatch):
    import torch

    from trainer import performance
    from trainer.lora_dropout import FastDropout
    from trainer.performance import Decision, choose_lora_dropout, choose_optimizer, use_lora_dropout

    fast = choose_lora_dropout("lora", 0.05, "cpu", 576)
    assert fast.value in ("kernel", "fast-mask")
    assert "ms with the kernel" in fast.reason and "a 512 x 576 activation" in fast.reason
    assert choose_lora_dropout("lora", 0.05, "cuda", 576).value == "torch"
    assert choose_lora_dropout("lora", 0.0, "cpu", 576).value == "none"
    assert choose_lora_dropout("full", 0.05, "cpu", 576).value == "none"

    def dropouts(model):
        return [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]

    def lora_model():
        model = _lora_tiny()
        for module in model.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout["default"] = torch.nn.Dropout(0.05)
        return model

    model = lora_model()
    assert use_lora_dropout(model, Decision("kernel", "measured")).value == "kernel"
    assert {type(d) for d in dropouts(model)} == {FastDropout} and all(d.kernel for d in dropouts(model))
    # Without a compiler: numpy's mask, and a kept "kernel" (a resumed run) falls back to it, saying so.
    monkeypatch.setattr(performance, "cpp_compiler", lambda: None)
    decision = choose_lora_dropout("lora", 0.05, "cpu", 576)
    assert decision.value == "fast-mask" and "no C++ compiler" in decision.reason
    model = lora_model()
    kept = use_lora_dropout(model, Decision("kernel", "kept"))
    assert kept.value == "fast-mask" and "cannot be built here" in kept.reason
    assert {type(d) for d in dropouts(model)} == {FastDropout} and not any(d.kernel for d in dropouts(model))

    assert choose_optimizer("cpu", "none").value == "adamw-fused"
    assert choose_optimizer("cuda", "ddp").value == "adamw-fused"
    assert choose_optimizer("cpu", "fsdp").value == "adamw"
    assert choose_optimizer("mps", "none").value == "adamw"
    # The fused kernel makes the same update as the per-tensor loop.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(3)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for fused, group in ((True, params), (None, copies)):
        optimizer = torch.optim.AdamW(group, lr=1e-2, weight_decay=0.1, fused=fused)
        for step in range(3):
            for p in group:
                p.grad = torch.full_like(p, 0.5 + step) * p.detach().sign()
            optimizer.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_benchmark_model_names_are_checked(tmp_path):
    from bench.model import BENCH_MODELS, bench_model

    with pytest.raises(ValueError, match="unknown benchmark model 'tiny'; valid: shape, real"):
        bench_model("tiny", tmp_path)
    assert BENCH_MODELS == ("shape", "real")


def test_step_profile_times_a_finished_jobs_step_in_a_copy(run_cli, tmp_path, capsys):
    """bench.step_profile trains a copy of a finished job to its first step and times that step there:
    the step's matrix products are caught by the op timer and timed again alone, and the job's own folder
    is left as it was (the copy is a temporary one). A folder that is no job is refused."""
    import json
    from pathlib import Path

    import yaml

    from bench import step_profile

    strategy = {"profiled": {"description": "test: a job for bench.step_profile", "fine_tuner": {"config": {
        "base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"},
        "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training_args": {"max_steps": 2, "per_device_train_batch_size": 2, "max_seq_length": 128,
                          "precision": "fp32", "logging_steps": 1},
        "device": "cpu"}}}}
    path = tmp_path / "profiled.yaml"
    path.write_text(yaml.safe_dump(strategy))
    result = run_cli("finetune", "start", "--strategy", "profiled", "--strategy-file", path, "--dataset",
                     DATASETS / "medical_qa.jsonl", "--runner", "local", "--foreground", "--json")
    assert result.exit_code == 0, result.output
    job_dir = Path(json.loads(result.stdout[result.stdout.index("{"):])["job_dir"])
    before = {p: p.stat().st_mtime_ns for p in job_dir.rglob("*")}
    capsys.readouterr()

    assert step_profile.main([str(job_dir), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "aten.mm.default" in out, out
    calls = int(out.split("matrix products: ")[1].split(" calls")[0])
    assert calls >= 2 * 4 * 2, f"every layer's q and v products at least, forward: {out}"
    assert {p: p.stat().st_mtime_ns for p in job_dir.rglob("*")} == before, "the job's folder is not touched"

    with pytest.raises(SystemExit) as refused:
        step_profile.main([str(tmp_path)])
    assert refused.value.code == 2 and "holds no job.json" in capsys.readouterr().err
