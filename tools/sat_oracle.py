#!/usr/bin/env python3
"""Golden test data from the ORIGINAL GLM-130B code (SwissArmyTransformer 0.2.12
+ the THUDM/GLM-130B repository), run on CPU over the tiny `sat-tiny` checkpoint.

This script re-implements nothing: it imports SAT's `GLM130B` model and
GLM-130B's `generate.py`, `evaluation/model.py`, `generation/strategies.py` and
`tools/convert_tp.py` from where they are installed / exported, drives them, and
writes what they return. The only changes made (at run time, never by editing
their files) are listed in PATCHES below and recorded in cases.json.

Environment (a venv of its own; nothing else is needed)::

    python3 -m venv oracle-venv
    oracle-venv/bin/pip install torch==2.13.0 numpy
    oracle-venv/bin/pip install --no-deps SwissArmyTransformer-0.2.12-py3-none-any.whl
    git -C GLM-130B.git archive HEAD | tar -x -C glm130b      # or a checkout

Run (from the repository root)::

    oracle-venv/bin/python tools/sat_oracle.py --glm130b glm130b \\
        --checkpoint sat-tiny/checkpoint --out tests/data/sat_oracle

Before producing anything the set-up is checked against sat-tiny's own golden
files (`--reference`, default: the checkpoint folder's parent, which holds
fwd_gmask.npz and gen_gmask.npz): logits, hidden states and KV cache within
1e-5 and the same 8 greedy tokens, or the run stops. Output is deterministic:
.npz files are written with fixed zip timestamps, torch runs on one thread
with AVX2 kernels, every seed is fixed; two runs give byte-identical files.
"""

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import types
import zipfile
from argparse import Namespace

import numpy as np

# ----------------------------------------------------------------------------
# ids of the tiny model (GLM-130B's command ids 150000+ do not fit a 1024 vocab)
# ----------------------------------------------------------------------------
SPECIAL = {
    "[MASK]": 1000,
    "[gMASK]": 1001,
    "[sMASK]": 1002,
    "eod": 1003,
    "sop": 1004,
    "eop": 1005,
    "ENC": 1006,
    "dBLOCK": 1007,
    "eos": 20,
}
END_TOKENS = [SPECIAL["eop"], SPECIAL["eos"]]
MAX_SEQUENCE_LENGTH = 128
SAMPLING_SEED = 1234

PATCHES = {
    "stub_modules": (
        "import-only stand-ins put in sys.modules for packages that are not installed and "
        "whose code is never executed on these paths: deepspeed (SAT imports "
        "deepspeed.runtime.activation_checkpointing.checkpointing.{checkpoint, get_cuda_rng_tracker, "
        "model_parallel_cuda_manual_seed}; used only for training / activation checkpointing), "
        "torchvision.utils.save_image (imported by SAT's generation/utils.py, image output only), "
        "requests and tqdm (imported by SAT's resources/download.py, model download only), "
        "tensorboardX.SummaryWriter (imported by SAT's training/utils.py, training logs only), "
        "datasets.load_dataset (imported by SAT's data_utils/hf_dataset.py, training data only), "
        "GLM-130B's `kernels` package (needs cpm_kernels and a CUDA fatbin; only its int4 "
        "compression / weight extraction use it, which are not run here: any call raises). "
        "Every stub function raises if called."
    ),
    "evaluation_package": (
        "GLM-130B's evaluation/__init__.py imports the task/dataset code (dataclass_wizard, scipy, "
        "icetk); `evaluation` is registered as a package pointing at the exported evaluation/ folder "
        "without running that __init__, so `from evaluation.model import batch_filling_sequence` "
        "loads the original evaluation/model.py alone."
    ),
    "cuda_on_cpu": (
        "torch.cuda.current_device() returns torch.device('cpu'); torch.cuda.LongTensor(data, device=...) "
        "builds a CPU int64 tensor (generate.py's fill_blanks uses it); torch.distributed is initialised "
        "with gloo, world size 1, and SAT's mpu with model parallel size 1; args.device = 'cpu'. "
        "Tensor.cuda() is the identity while tools/convert_tp.py runs."
    ),
    "attention_probs_dtype": (
        "SAT's SelfAttentionWithFP32SoftmaxMixin.attention_fn ends its fp32 softmax with "
        "`attention_probs.half()`, which breaks an fp32 model (bmm of half probs with fp32 values). "
        "While that function runs, Tensor.half() is replaced by a cast to the model dtype (the dtype "
        "of the value tensor): for an fp32 model no cast, for the fp16 model exactly .half(). "
        "Nothing else in attention_fn calls .half()."
    ),
    "dense_h_to_4h_dtype": (
        "DeepNormWithGLUMixin.reinit() re-creates mlp.dense_h_to_4h with params_dtype=torch.half "
        "whatever args.fp16 says; GLM-130B's initialize then calls model.half(). For the fp32 model the "
        "parameters that are not fp32 (only dense_h_to_4h) are cast to fp32 BEFORE loading the "
        "checkpoint, so the fp32 checkpoint values load unrounded. Buffers are left alone: the rotary "
        "inv_freq buffer stays fp16 as SAT creates it (SAT's rotary table is fp16 in both modes)."
    ),
    "threads": "torch.set_num_threads(1) for bit-for-bit reproducible CPU results.",
    "cpu_isa": (
        "ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 are set before torch is imported: "
        "torch's CPU kernels (softmax and friends, oneDNN matmuls) round differently with AVX-512, "
        "which moved sat-tiny's logits by ~3e-5; with AVX2 kernels fwd_gmask and gen_gmask are "
        "reproduced bit for bit. This selects kernels only; no arithmetic is changed by the script."
    ),
    "apex": (
        "apex is not installed: SAT prints a warning and uses torch.nn.LayerNorm and its own unfused "
        "masked_fill(-10000) + fp32 softmax path (the path described in glm-130b-facts.md)."
    ),
}


# ----------------------------------------------------------------------------
# environment set-up: stubs, CPU stand-ins for CUDA calls, distributed init
# ----------------------------------------------------------------------------
def _raiser(name):
    def f(*args, **kwargs):
        raise RuntimeError(f"{name} is a stub in tools/sat_oracle.py and must not be called")

    f.__name__ = name.rsplit(".", 1)[-1]
    return f


def _stub_module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__oracle_stub__ = True
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


def install_stubs():
    def missing(name):
        return importlib.util.find_spec(name) is None

    if missing("deepspeed"):
        _stub_module("deepspeed", add_config_arguments=lambda parser: parser)
        _stub_module("deepspeed.runtime")
        _stub_module("deepspeed.runtime.activation_checkpointing")
        _stub_module(
            "deepspeed.runtime.activation_checkpointing.checkpointing",
            checkpoint=_raiser("deepspeed.checkpoint"),
            get_cuda_rng_tracker=_raiser("deepspeed.get_cuda_rng_tracker"),
            model_parallel_cuda_manual_seed=_raiser("deepspeed.model_parallel_cuda_manual_seed"),
        )
    if missing("torchvision"):
        _stub_module("torchvision")
        _stub_module("torchvision.utils", save_image=_raiser("torchvision.utils.save_image"))
    if missing("requests"):
        _stub_module("requests", get=_raiser("requests.get"))
    if missing("tqdm"):
        _stub_module("tqdm", tqdm=_raiser("tqdm.tqdm"))
    if missing("datasets"):
        _stub_module("datasets", load_dataset=_raiser("datasets.load_dataset"))
    if missing("tensorboardX"):
        _stub_module("tensorboardX", SummaryWriter=_raiser("tensorboardX.SummaryWriter"))
    # GLM-130B's own CUDA kernels (int4 packing / int8-int4 extraction): never called here.
    _stub_module(
        "kernels",
        compress_int4_weight=_raiser("kernels.compress_int4_weight"),
        extract_weight_to_half=_raiser("kernels.extract_weight_to_half"),
    )


def patch_cuda_for_cpu(torch):
    torch.cuda.current_device = lambda: torch.device("cpu")

    def long_tensor(data, device=None):
        return torch.tensor(data, dtype=torch.long, device=device)

    torch.cuda.LongTensor = long_tensor


def init_distributed(torch, mpu):
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)


def patch_attention_probs_dtype(torch, glm_mod):
    """Inside SAT's fp32-softmax attention_fn, Tensor.half() casts to the model dtype."""
    cls = glm_mod.SelfAttentionWithFP32SoftmaxMixin
    original = cls.attention_fn
    if getattr(original, "__oracle_patched__", False):
        return

    @functools.wraps(original)
    def attention_fn(self, query_layer, key_layer, value_layer, *args, **kwargs):
        model_dtype = value_layer.dtype
        saved = torch.Tensor.half
        torch.Tensor.half = lambda t, *a, **k: t.to(model_dtype)
        try:
            return original(self, query_layer, key_layer, value_layer, *args, **kwargs)
        finally:
            torch.Tensor.half = saved

    attention_fn.__oracle_patched__ = True
    cls.attention_fn = attention_fn


class Env:
    """Everything imported from SAT and GLM-130B, after the set-up above."""

    def __init__(self, glm130b_dir, cpu_isa="avx2"):
        glm130b_dir = os.path.abspath(glm130b_dir)
        if cpu_isa == "avx2":
            # see PATCHES["cpu_isa"]; read by torch when it loads, so set before the import
            assert "torch" not in sys.modules, "torch must not be imported before Env()"
            os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
            os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
        install_stubs()
        import torch

        torch.set_num_threads(1)
        patch_cuda_for_cpu(torch)

        import SwissArmyTransformer
        from SwissArmyTransformer import mpu
        from SwissArmyTransformer import arguments as sat_arguments
        from SwissArmyTransformer.model.official import glm130B_model

        init_distributed(torch, mpu)
        patch_attention_probs_dtype(torch, glm130B_model)

        sys.path.insert(0, glm130b_dir)
        # `evaluation` as a bare package: its __init__ pulls in the task code (see PATCHES).
        if "evaluation" not in sys.modules:
            pkg = types.ModuleType("evaluation")
            pkg.__path__ = [os.path.join(glm130b_dir, "evaluation")]
            sys.modules["evaluation"] = pkg
        import generate as glm_generate  # GLM-130B's generate.py
        import generation as glm_generation  # GLM-130B's generation/strategies.py
        import evaluation.model as glm_eval_model

        spec = importlib.util.spec_from_file_location(
            "glm130b_convert_tp", os.path.join(glm130b_dir, "tools", "convert_tp.py")
        )
        convert_tp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(convert_tp)

        for name, mod in [
            ("generate", glm_generate),
            ("generation", glm_generation),
            ("evaluation.model", glm_eval_model),
        ]:
            path = os.path.abspath(mod.__file__)
            assert path.startswith(glm130b_dir + os.sep), (name, path)

        self.torch = torch
        self.sat = SwissArmyTransformer
        self.sat_arguments = sat_arguments
        self.mpu = mpu
        self.GLM130B = glm130B_model.GLM130B
        self.generate = glm_generate
        self.BaseStrategy = glm_generation.BaseStrategy
        self.BeamSearchStrategy = glm_generation.BeamSearchStrategy
        self.batch_filling_sequence = glm_eval_model.batch_filling_sequence
        self.convert_tp = convert_tp
        self.glm130b_dir = glm130b_dir


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------
def read_checkpoint(checkpoint_dir, torch):
    with open(os.path.join(checkpoint_dir, "model_config.json")) as f:
        config = json.load(f)
    iteration, _, sds = read_checkpoint_states(checkpoint_dir, torch)
    return iteration, config, sds


def sat_args(env, config, fp16):
    """SAT's own argument defaults (its argparse groups), then model_config.json on top."""
    a = env.sat_arguments
    parser = argparse.ArgumentParser()
    for add in (
        a.add_model_config_args,
        a.add_training_args,
        a.add_evaluation_args,
        a.add_data_args,
        a.add_tokenization_args,
        a.add_text_generate_args,
    ):
        parser = add(parser)
    args = parser.parse_args([])
    for k, v in config.items():
        if k not in ("oracle", "model_class", "tokenizer_type"):
            setattr(args, k, v)
    args.fp16 = fp16
    args.model_parallel_size = 1
    args.device = "cpu"
    args.mode = "inference"
    args.do_train = False
    return args


def build_model(env, config, state_dict, fp16):
    torch = env.torch
    args = sat_args(env, config, fp16)
    model = env.GLM130B(args)
    if fp16:
        model = model.half()  # as GLM-130B's initialize_model_and_tokenizer
    else:
        # see PATCHES["dense_h_to_4h_dtype"]
        for p in model.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)  # as SAT's load_checkpoint
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    dtype = torch.half if fp16 else torch.float32
    for n, p in model.named_parameters():
        assert p.dtype == dtype, (n, p.dtype)
    return model, args


def run_forward(env, model, tokens, position_ids, attention_mask):
    """One SAT forward; returns logits [b,s,V], hidden_states [L,b,s,h], mem_kv [L,b,s,2h]."""
    torch = env.torch
    with torch.no_grad():
        logits, *per_layer = model(tokens, position_ids, attention_mask, output_hidden_states=True)
    hidden = torch.stack([o["hidden_states"] for o in per_layer]).transpose(1, 2)  # SAT: [s,b,h]
    mem_kv = torch.stack([o["mem_kv"] for o in per_layer])
    return logits, hidden, mem_kv


# ----------------------------------------------------------------------------
# generation helpers
# ----------------------------------------------------------------------------
class IdTokenizer:
    """Stand-in for icetk: texts are whitespace-separated token ids."""

    def tokenize(self, text):
        return [int(t) for t in text.split()]

    def detokenize(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def get_command(self, name):
        return SPECIAL[name]


def set_generate_args(env, out_seq_length, num_beams=1, sampling_strategy="BaseStrategy"):
    env.generate.args = Namespace(
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        out_seq_length=out_seq_length,
        num_beams=num_beams,
        sampling_strategy=sampling_strategy,
        device="cpu",
    )


class Recorder:
    """Wraps a strategy's forward/finalize and batch_filling_sequence to record what passes through."""

    def __init__(self, env, strategy):
        self.env = env
        self.strategy = strategy
        self.calls = []  # one per batch_filling_sequence call (= per blank)
        torch = env.torch
        orig_forward = strategy.forward
        orig_finalize = strategy.finalize
        orig_bfs = env.generate.batch_filling_sequence
        rec = self

        def forward(logits, tokens, mems, *a, **k):
            blank = rec.calls[-1]
            blank["step_logits"].append(logits.detach().float().clone())
            blank["step_tokens_in"].append(tokens.detach().clone())
            blank["rng_before"].append(torch.get_rng_state())
            if hasattr(strategy, "end_beams"):
                orig_topk = torch.topk

                def topk(x, *ta, **tk):
                    r = orig_topk(x, *ta, **tk)
                    blank["beam_topk"].append((x.detach().clone(), r.values.clone(), r.indices.clone()))
                    return r

                torch.topk = topk
                try:
                    out = orig_forward(logits, tokens, mems, *a, **k)
                finally:
                    torch.topk = orig_topk
            else:
                out = orig_forward(logits, tokens, mems, *a, **k)
            blank["rng_after"].append(torch.get_rng_state())
            blank["step_tokens_out"].append(out[0].detach().clone())
            if hasattr(strategy, "cached_beam_scores"):
                s = strategy.cached_beam_scores
                blank["beam_scores"].append(s.detach().clone() if isinstance(s, torch.Tensor) else s)
            return out

        def finalize(tokens, mems):
            blank = rec.calls[-1]
            beam = hasattr(strategy, "end_beams")
            if beam:
                # end beams found during the search (before finalize adds the unfinished ones)
                blank["search_end_beams"] = [b.tolist() for b in strategy.end_beams[0]]
                blank["search_end_scores"] = [float(x) for x in strategy.end_beams_penalized_scores[0]]
                blank["is_done_before_finalize"] = bool(strategy._is_done[0])
                orig_init_cache = strategy._init_cache

                def init_cache():
                    # finalize(): consider_end adds the live beams, then _init_cache() resets
                    blank["final_end_beams"] = [b.tolist() for b in strategy.end_beams[0]]
                    blank["final_end_scores"] = [float(x) for x in strategy.end_beams_penalized_scores[0]]
                    orig_init_cache()

                strategy._init_cache = init_cache
            try:
                ret = orig_finalize(tokens, mems)
            finally:
                if beam:
                    del strategy._init_cache  # back to the class method
            if beam:
                blank["returned_beams"] = [b.tolist() for b in ret[0][0]]
            else:
                blank["returned_tokens"] = ret[0].tolist()
            return ret

        def bfs(model, seqs, context_lengths, strategy, **kw):
            rec.calls.append(
                {
                    "context": seqs.tolist(),
                    "step_logits": [],
                    "step_tokens_in": [],
                    "step_tokens_out": [],
                    "rng_before": [],
                    "rng_after": [],
                    "beam_scores": [],
                    "beam_topk": [],
                }
            )
            return orig_bfs(model, seqs, context_lengths, strategy, **kw)

        strategy.forward = forward
        strategy.finalize = finalize
        env.generate.batch_filling_sequence = bfs
        self._restore = lambda: setattr(env.generate, "batch_filling_sequence", orig_bfs)

    def close(self):
        self._restore()
        for name in ("forward", "finalize"):
            self.strategy.__dict__.pop(name, None)


def count_multinomial(env):
    """Context manager that records every torch.multinomial call (args and RNG state around it)."""
    torch = env.torch
    log = []
    orig = torch.multinomial

    def multinomial(probs, num_samples, *a, **k):
        before = torch.get_rng_state()
        out = orig(probs, num_samples, *a, **k)
        log.append(
            {
                "probs": probs.detach().clone(),
                "num_samples": num_samples,
                "extra": (a, k),
                "out": out.clone(),
                "before": before,
                "after": torch.get_rng_state(),
            }
        )
        return out

    @contextlib.contextmanager
    def cm():
        torch.multinomial = multinomial
        try:
            yield log
        finally:
            torch.multinomial = orig

    return cm()


def top12_margin(logits):
    """smallest top1 - top2 gap over the rows of [..., V] logits"""
    flat = logits.reshape(-1, logits.shape[-1])
    top = flat.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


# ----------------------------------------------------------------------------
# deterministic .npz writer (numpy's savez stamps the current time into the zip)
# ----------------------------------------------------------------------------
def save_npz(path, arrays):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in arrays:
            arr = np.ascontiguousarray(arrays[key])
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def array_desc(arrays):
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in arrays.items()}


def to_np(t):
    return t.detach().cpu().numpy()



# ----------------------------------------------------------------------------
# fill_blanks driver
# ----------------------------------------------------------------------------
def run_fill_blanks(env, model, raw_text, strategy, out_seq_length, num_beams=1):
    """Run GLM-130B's generate.fill_blanks; return its result and a record of every blank."""
    torch = env.torch
    beam = isinstance(strategy, env.BeamSearchStrategy)
    set_generate_args(
        env,
        out_seq_length,
        num_beams=num_beams,
        sampling_strategy="BeamSearchStrategy" if beam else "BaseStrategy",
    )
    tok = IdTokenizer()
    rec = Recorder(env, strategy)
    try:
        with torch.no_grad(), count_multinomial(env) as mlog:
            answers, _answers_with_style, blanks_text = env.generate.fill_blanks(raw_text, model, tok, strategy)
    finally:
        rec.close()

    use_gmask = "[MASK]" not in raw_text and "[sMASK]" not in raw_text
    mask_name = "[MASK]" if "[MASK]" in raw_text else ("[sMASK]" if "[sMASK]" in raw_text else "[gMASK]")
    blanks = []
    for call in rec.calls:
        context = call["context"][0]
        ctx_len = len(context)
        mask_position = context.index(SPECIAL[mask_name])
        max_gen = out_seq_length - ctx_len
        _, attn_mask, pos_ids = env.generate.get_masks_and_position_ids(
            torch.tensor([context], dtype=torch.long),
            mask_position=mask_position,
            max_gen_length=max_gen,
            gmask=use_gmask,
        )
        b = {
            "context": context,
            "context_length": ctx_len,
            "mask_position": mask_position,
            "max_gen_length": max_gen,
            "steps": len(call["step_logits"]),
            "position_ids": to_np(pos_ids),
            "attention_mask": to_np(attn_mask),
            "call": call,
        }
        if not beam:
            final = call["returned_tokens"][0][0]  # [batch=1][num_beams=1] row
            generated = final[ctx_len:]
            b["tokens"] = final
            b["generated"] = generated
            b["stopped_at_end_token"] = bool(generated) and generated[-1] in END_TOKENS
            b["step_logits"] = torch.stack(call["step_logits"], dim=1).reshape(1, b["steps"], -1)
        blanks.append(b)
    return {
        "raw_text": raw_text,
        "use_gmask": use_gmask,
        "mask_token": mask_name,
        "answers": answers,
        "blanks_text": blanks_text,
        "blanks": blanks,
        "multinomial_log": mlog,
        # the ids fill_blanks built (mask added / eos appended as generate.py does), sop excluded
        "input_ids": rec.calls[0]["context"][0][:-1],
    }


def recompute_nocache(env, model, blank):
    """Logits of each greedy step by forwarding the whole prefix (no KV cache)."""
    torch = env.torch
    tokens = torch.tensor([blank["tokens"]], dtype=torch.long)
    pos = torch.tensor(blank["position_ids"])
    mask = torch.tensor(blank["attention_mask"])
    c = blank["context_length"]
    rows = []
    with torch.no_grad():
        for j in range(blank["steps"]):
            n = c + j
            logits, *_ = model(tokens[:, :n], pos[:, :n], mask[..., :n, :n])
            rows.append(logits[:, -1].float())
    return torch.stack(rows, dim=1)


def ids_of(text):
    return [int(t) for t in text.split()]


def seed_all(env, seed=SAMPLING_SEED):
    env.torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# inputs (fwd_gmask / gen_gmask are sat-tiny's own cases, recomputed to check the set-up)
# ----------------------------------------------------------------------------
GMASK_PROMPT = [17, 345, 902, 66, 128, 511, 7, 233, 874, 45, 390, 612]
FORCED = [301, 77, 845, 12, 560, 999]
GEN_GMASK_TEXT = " ".join(map(str, GMASK_PROMPT))

# greedy prompts: picked among seeded random prompts for blanks that end by themselves
# with a comfortable top1-top2 margin along the greedy path
GEN_MASK_TEXT = "743 785 941 346 [MASK] 858 350 57 558 172 916 284"
GEN_SMASK_TEXT = "853 814 102 [sMASK] 127 458 643"
GEN_TWO_MASKS_TEXT = "570 35 [MASK] 907 [MASK] 458 221 521 307 680"
# beam prompts: picked among seeded random prompts so that end beams are found during the search
# and the n-gram ban changes the result (BEAM_MASK_TEXT), and so that length_penalty 0.7 returns a
# different set of beams than 1.0 (BEAM_LP_TEXT)
BEAM_MASK_TEXT = "799 981 759 750 [MASK] 324 37 140 849 511 383 789 776"
BEAM_LP_TEXT = "462 753 [MASK] 112 92 919"

CAUSAL_ROWS = [
    [17, 345, 902, 66, 128, 511, 7, 233, 874, 45, 390, 612, 301, 77, 845, 12],
    [560, 999, 20, 743, 785, 941, 346, 858, 350, 57, 558, 172, 916, 284, 1004, 3],
]


# ----------------------------------------------------------------------------
# checks against sat-tiny
# ----------------------------------------------------------------------------
def verify_reference(env, model, ref_dir, tol=1e-5):
    torch = env.torch
    out = {}
    ref = np.load(os.path.join(ref_dir, "fwd_gmask.npz"))
    tokens = torch.tensor([GMASK_PROMPT + [SPECIAL["[gMASK]"], SPECIAL["sop"]] + FORCED])
    assert (tokens.numpy() == ref["tokens"]).all(), "fwd_gmask tokens differ from the reference"
    ctx = tokens[:, : len(GMASK_PROMPT) + 2]
    _, mask, pos = env.generate.get_masks_and_position_ids(
        ctx, mask_position=len(GMASK_PROMPT), max_gen_length=len(FORCED), gmask=True
    )
    assert (to_np(mask) == ref["attention_mask"]).all() and (to_np(pos) == ref["position_ids"]).all()
    logits, hidden, mem_kv = run_forward(env, model, tokens, pos, mask)
    fwd = {}
    for k, v in (("logits", logits), ("hidden_states", hidden), ("mem_kv", mem_kv)):
        fwd[k] = float(np.abs(to_np(v) - ref[k]).max())
        assert fwd[k] <= tol, (k, fwd[k])
    out["fwd_gmask_max_abs_diff"] = fwd

    ref = np.load(os.path.join(ref_dir, "gen_gmask.npz"))
    seed_all(env)
    strategy = env.BaseStrategy(batch_size=1, temperature=1.0, top_k=1, end_tokens=END_TOKENS)
    res = run_fill_blanks(env, model, GEN_GMASK_TEXT, strategy, out_seq_length=ref["tokens"].shape[1])
    b = res["blanks"][0]
    assert b["generated"] == ref["generated"][0].tolist(), (b["generated"], ref["generated"])
    nocache = recompute_nocache(env, model, b)
    out["gen_gmask"] = {
        "generated": b["generated"],
        "same_tokens": True,
        "step_logits_cached_max_abs_diff": float(np.abs(to_np(b["step_logits"]) - ref["step_logits_cached"]).max()),
        "step_logits_nocache_max_abs_diff": float(np.abs(to_np(nocache) - ref["step_logits_nocache"]).max()),
        "position_ids_equal": bool((b["position_ids"] == ref["position_ids"]).all()),
        "attention_mask_equal": bool((b["attention_mask"] == ref["attention_mask"]).all()),
    }
    return out


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------
def forward_arrays(env, model, tokens, pos, mask, fp16=False):
    logits, hidden, mem_kv = run_forward(env, model, tokens, pos, mask)
    arrays = {
        "tokens": to_np(tokens),
        "position_ids": to_np(pos),
        "attention_mask": to_np(mask),
    }
    if fp16:
        arrays["logits"] = to_np(logits)  # float16, as the model returns it
        arrays["logits_f32"] = to_np(logits.float())
    else:
        arrays["logits"] = to_np(logits)
    arrays["hidden_states"] = to_np(hidden)
    arrays["mem_kv"] = to_np(mem_kv)
    return arrays


def case_fwd_mask(env, model):
    torch = env.torch
    p = 6  # [MASK] goes between GMASK_PROMPT[:6] and GMASK_PROMPT[6:]
    seq = GMASK_PROMPT[:p] + [SPECIAL["[MASK]"]] + GMASK_PROMPT[p:] + [SPECIAL["eos"], SPECIAL["sop"]]
    ctx = torch.tensor([seq])
    _, mask, pos = env.generate.get_masks_and_position_ids(ctx, mask_position=p, max_gen_length=len(FORCED), gmask=False)
    tokens = torch.tensor([seq + FORCED])
    arrays = forward_arrays(env, model, tokens, pos, mask)
    info = {
        "kind": "forward",
        "description": (
            "prompt with [MASK] in the middle + eos (fill_blanks appends eos when the text does not end "
            "with a mask) + sop + 6 forced tokens; generate.get_masks_and_position_ids(gmask=False): "
            "columns < context_length-1 visible to every row, causal elsewhere; positions arange except "
            "from the sop on, where every position equals the mask position."
        ),
        "raw_text": " ".join(map(str, GMASK_PROMPT[:p])) + " [MASK] " + " ".join(map(str, GMASK_PROMPT[p:])),
        "context_length": len(seq),
        "mask_position": p,
        "gmask": False,
        "tokens": tokens[0].tolist(),
        "position_ids": pos[0].tolist(),
    }
    return info, arrays


def case_fwd_causal(env, model):
    torch = env.torch
    tokens = torch.tensor(CAUSAL_ROWS)
    s = tokens.shape[1]
    mask = (torch.ones(1, 1, s, s).tril() < 0.5).bool()
    pos = torch.arange(s).unsqueeze(0).expand(tokens.shape[0], s).contiguous()
    arrays = forward_arrays(env, model, tokens, pos, mask)
    info = {
        "kind": "forward",
        "description": (
            "batch of 2 different rows, 16 tokens each, plain causal mask (True above the diagonal), "
            "positions arange(16) for both rows. The mask is [1,1,s,s] and broadcasts over the batch, "
            "as generate.py's masks do."
        ),
        "tokens": tokens.tolist(),
        "position_ids": pos.tolist(),
    }
    return info, arrays


def case_fwd_fp16(env, config, state_dict, fp32_logits_of_gmask):
    torch = env.torch
    model16, _ = build_model(env, config, state_dict, fp16=True)
    tokens = torch.tensor([GMASK_PROMPT + [SPECIAL["[gMASK]"], SPECIAL["sop"]] + FORCED])
    ctx = tokens[:, : len(GMASK_PROMPT) + 2]
    _, mask, pos = env.generate.get_masks_and_position_ids(
        ctx, mask_position=len(GMASK_PROMPT), max_gen_length=len(FORCED), gmask=True
    )
    arrays = forward_arrays(env, model16, tokens, pos, mask, fp16=True)
    diff = np.abs(arrays["logits_f32"] - fp32_logits_of_gmask)
    info = {
        "kind": "forward_fp16",
        "description": (
            "fwd_gmask's inputs through the model in SAT's fp16 mode, as GLM-130B's initialize builds it: "
            "args.fp16=True (rotary precision half), GLM130B(args).half(), the fp32 checkpoint loaded into "
            "the half parameters (load_state_dict rounds to fp16). Run on CPU with torch's half kernels; "
            "attention scores fp16, softmax fp32 then .half(), LayerNorm torch.nn.LayerNorm in half."
        ),
        "tokens": tokens[0].tolist(),
        "position_ids": pos[0].tolist(),
        "logits_vs_fp32_model": {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "argmax_agree_rows": int((arrays["logits_f32"].argmax(-1) == fp32_logits_of_gmask.argmax(-1)).sum()),
            "rows": int(diff.shape[1]),
        },
        "parameter_dtype": "float16",
    }
    del model16
    return info, arrays


def greedy_case(env, model, raw_text, out_seq_length, description):
    seed_all(env)
    strategy = env.BaseStrategy(batch_size=1, temperature=1.0, top_k=1, end_tokens=END_TOKENS)
    res = run_fill_blanks(env, model, raw_text, strategy, out_seq_length)
    arrays = {"input_ids": np.array([res["input_ids"]], dtype=np.int64)}
    answer = ids_of(res["answers"][0])
    arrays["answer_ids"] = np.array([answer], dtype=np.int64)
    blanks = []
    for i, b in enumerate(res["blanks"]):
        nocache = recompute_nocache(env, model, b)
        gen = b["generated"]
        blank_ids = gen[:-1] if b["stopped_at_end_token"] else gen
        assert " ".join(map(str, blank_ids)) == res["blanks_text"][0][i]
        pre = f"blank{i}/"
        arrays[pre + "context"] = np.array([b["context"]], dtype=np.int64)
        arrays[pre + "tokens"] = np.array([b["tokens"]], dtype=np.int64)
        arrays[pre + "position_ids"] = b["position_ids"]
        arrays[pre + "attention_mask"] = b["attention_mask"]
        arrays[pre + "generated"] = np.array([gen], dtype=np.int64)
        arrays[pre + "step_logits_cached"] = to_np(b["step_logits"])
        blanks.append(
            {
                "context": b["context"],
                "context_length": b["context_length"],
                "mask_position": b["mask_position"],
                "max_gen_length": b["max_gen_length"],
                "generated": gen,
                "blank_ids": blank_ids,
                "stopped_at_end_token": b["stopped_at_end_token"],
                "steps": b["steps"],
                "min_top1_top2_logit_margin": top12_margin(b["step_logits"]),
                "cached_vs_nocache_max_abs_diff": float((b["step_logits"] - nocache).abs().max()),
            }
        )
    info = {
        "kind": "greedy_generation",
        "description": description,
        "raw_text": raw_text,
        "mask_token": res["mask_token"],
        "gmask": res["use_gmask"],
        "out_seq_length": out_seq_length,
        "strategy": {
            "class": "generation.BaseStrategy",
            "batch_size": 1,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 0.0,
            "end_tokens": END_TOKENS,
        },
        "seed": SAMPLING_SEED,
        "input_ids": res["input_ids"],
        "answer_ids": answer,
        "blanks": blanks,
        "min_top1_top2_logit_margin": min(x["min_top1_top2_logit_margin"] for x in blanks),
    }
    return info, arrays


def beam_case(
    env, model, raw_text, max_new_tokens, length_penalty, no_repeat_ngram_size, description, compare=None,
    store_logits=True,
):
    """compare: optional (length_penalty, no_repeat_ngram_size) of a second run whose answers are noted;
    store_logits: keep the per-step logits in the .npz (left out of some cases to keep the data small)."""
    seed_all(env)
    params = {
        "class": "generation.BeamSearchStrategy",
        "batch_size": 1,
        "num_beams": 4,
        "length_penalty": length_penalty,
        "consider_end": True,
        "end_tokens": END_TOKENS,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "min_gen_length": 2,
        "deterministic": True,
    }
    strategy = env.BeamSearchStrategy(
        batch_size=1,
        num_beams=4,
        length_penalty=length_penalty,
        consider_end=True,
        end_tokens=END_TOKENS,
        no_repeat_ngram_size=no_repeat_ngram_size,
        min_gen_length=2,
        deterministic=True,
    )
    input_len = len(probe_input_ids(env, raw_text)) + 1  # + sop
    out_seq_length = input_len + max_new_tokens
    res = run_fill_blanks(env, model, raw_text, strategy, out_seq_length, num_beams=4)
    arrays = {"input_ids": np.array([res["input_ids"]], dtype=np.int64)}
    blanks = []
    for i, b in enumerate(res["blanks"]):
        call = b["call"]
        c = b["context_length"]
        pre = f"blank{i}/"
        arrays[pre + "context"] = np.array([b["context"]], dtype=np.int64)
        arrays[pre + "position_ids"] = b["position_ids"]
        arrays[pre + "attention_mask"] = b["attention_mask"]
        steps = []
        min_gap = None
        for j, (lg, toks, scores, tk) in enumerate(
            zip(call["step_logits"], call["step_tokens_out"], call["beam_scores"], call["beam_topk"])
        ):
            if store_logits:
                arrays[pre + f"step{j}/logits"] = to_np(lg)  # [batch=1, beams at this step, V]
            probs, values, _ = tk
            gap = decisive_score_gap(probs, values.shape[-1], lg.shape[-1], strategy.num_beams)
            min_gap = gap if min_gap is None else min(min_gap, gap)
            steps.append(
                {
                    "beams_in": int(lg.shape[1]),
                    "continuing_beams_generated": [row[c:] for row in toks[0].tolist()],
                    "cached_beam_scores": [float(x) for x in scores.reshape(-1).tolist()],
                }
            )
        blanks.append(
            {
                "context": b["context"],
                "context_length": c,
                "mask_position": b["mask_position"],
                "max_gen_length": b["max_gen_length"],
                "steps": b["steps"],
                "done_before_finalize": call["is_done_before_finalize"],
                "end_beams_found_in_search": [row[c:] for row in call["search_end_beams"]],
                "end_beams_found_in_search_penalized_scores": call["search_end_scores"],
                "returned_beams_generated": [row[c:] for row in call["returned_beams"]],
                "returned_beams_penalized_scores": call["final_end_scores"],
                "returned_beams_lengths": [len(row) for row in call["returned_beams"]],
                "per_step": steps,
                "min_decisive_score_gap": min_gap,
            }
        )
        assert call["final_end_beams"] == call["returned_beams"]
    answers = [ids_of(a) for a in res["answers"]]
    for r, a in enumerate(answers):
        arrays[f"answer{r}_ids"] = np.array([a], dtype=np.int64)
    info = {
        "kind": "beam_search",
        "description": description,
        "raw_text": raw_text,
        "mask_token": res["mask_token"],
        "gmask": res["use_gmask"],
        "out_seq_length": out_seq_length,
        "strategy": params,
        "fill_blanks_args": {"num_beams": 4, "sampling_strategy": "BeamSearchStrategy"},
        "input_ids": res["input_ids"],
        "answers_ids": answers,
        "blanks_ids": [[ids_of(t) for t in bl] for bl in res["blanks_text"]],
        "blanks": blanks,
        "torch_multinomial_calls": len(res["multinomial_log"]),
    }
    if compare is not None:
        other, _ = beam_case(env, model, raw_text, max_new_tokens, compare[0], compare[1], "", store_logits=False)
        info["same_prompt_other_settings"] = {
            "length_penalty": compare[0],
            "no_repeat_ngram_size": compare[1],
            "returned_beams_generated": [b["returned_beams_generated"] for b in other["blanks"]],
            "returned_beams_penalized_scores": [b["returned_beams_penalized_scores"] for b in other["blanks"]],
            "answers_differ": other["answers_ids"] != info["answers_ids"],
        }
    return info, arrays


def decisive_score_gap(probs, k, vocab, num_beams):
    """Smallest gap in cumulative log-prob score between consecutive ranked candidates, over the ranks
    that decide the step (up to the candidate that fills the last continuing beam, and the next one).
    probs is what BeamSearchStrategy hands torch.topk: softmax of the scores, so log-ratios = score gaps."""
    p, idx = probs.reshape(-1).double().topk(k)
    cont, last = 0, k - 1
    for i in range(k):
        if int(idx[i]) % vocab not in END_TOKENS:
            cont += 1
            if cont == num_beams:
                last = i
                break
    last = min(last + 1, k - 1)
    logp = p[: last + 1].log()
    return float((logp[:-1] - logp[1:]).min())


def probe_input_ids(env, raw_text):
    """fill_blanks' own id sequence for raw_text, read from its first batch_filling_sequence call
    (the call is intercepted before the model runs)."""
    seen = []

    def fake_bfs(model, seqs, context_lengths, strategy, **kw):
        seen.append(seqs[0, :-1].tolist())
        raise _Probe()

    orig = env.generate.batch_filling_sequence
    env.generate.batch_filling_sequence = fake_bfs
    set_generate_args(env, MAX_SEQUENCE_LENGTH)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            env.generate.fill_blanks(raw_text, None, IdTokenizer(), env.BaseStrategy(batch_size=1, end_tokens=END_TOKENS))
    except _Probe:
        pass
    finally:
        env.generate.batch_filling_sequence = orig
    return seen[0]


class _Probe(Exception):
    pass


def sampling_case(env, model, raw_text, max_new_tokens, temperature, top_k, top_p, description):
    torch = env.torch
    strategy = env.BaseStrategy(
        batch_size=1, temperature=temperature, top_k=top_k, top_p=top_p, end_tokens=END_TOKENS
    )
    input_len = len(probe_input_ids(env, raw_text)) + 1
    out_seq_length = input_len + max_new_tokens
    seed_all(env)
    res = run_fill_blanks(env, model, raw_text, strategy, out_seq_length)
    b = res["blanks"][0]
    call = b["call"]
    mlog = res["multinomial_log"]
    n = b["steps"]
    assert len(mlog) == n
    # RNG accounting: the model forward draws nothing, the strategy only inside torch.multinomial
    rng_only_multinomial = all(
        torch.equal(call["rng_before"][j], mlog[j]["before"]) and torch.equal(mlog[j]["after"], call["rng_after"][j])
        for j in range(n)
    ) and all(torch.equal(call["rng_after"][j], call["rng_before"][j + 1]) for j in range(n - 1))
    # torch's CPU multinomial(p, 1) == argmax(p / E), E ~ Exp(1) drawn by exponential_ on the same generator?
    noise, same_as_exponential_trick = [], True
    saved = torch.get_rng_state()
    for j in range(n):
        torch.set_rng_state(mlog[j]["before"])
        p = mlog[j]["probs"]
        e = torch.empty_like(p).exponential_(1)
        pick = (p / e).argmax(dim=-1, keepdim=True)
        same_as_exponential_trick &= bool(torch.equal(pick, mlog[j]["out"])) and bool(
            torch.equal(torch.get_rng_state(), mlog[j]["after"])
        )
        noise.append(e)
    torch.set_rng_state(saved)
    probs = torch.stack([m["probs"] for m in mlog], dim=1)  # [1, steps, V]
    arrays = {
        "input_ids": np.array([res["input_ids"]], dtype=np.int64),
        "context": np.array([b["context"]], dtype=np.int64),
        "generated": np.array([b["generated"]], dtype=np.int64),
        "step_logits": to_np(b["step_logits"]),
        "step_probs": to_np(probs),
        "step_exponential_noise": to_np(torch.stack(noise, dim=1)),
    }
    kept = [int((m["probs"] > 0).sum()) for m in mlog]
    info = {
        "kind": "sampling",
        "description": description,
        "raw_text": raw_text,
        "mask_token": res["mask_token"],
        "gmask": res["use_gmask"],
        "out_seq_length": out_seq_length,
        "strategy": {
            "class": "generation.BaseStrategy",
            "batch_size": 1,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "end_tokens": END_TOKENS,
        },
        "seed": {"call": "torch.manual_seed", "value": SAMPLING_SEED, "when": "right before fill_blanks"},
        "input_ids": res["input_ids"],
        "generated": b["generated"],
        "stopped_at_end_token": b["stopped_at_end_token"],
        "answer_ids": ids_of(res["answers"][0]),
        "tokens_with_nonzero_probability_per_step": kept,
        "rng": {
            "draws_per_step": "exactly one torch.multinomial(probs[1,V] float32, num_samples=1) call; "
            "nothing else touches torch's default generator (model in eval mode, no dropout)",
            "verified_only_multinomial_changes_rng_state": bool(rng_only_multinomial),
            "multinomial_equals_argmax_p_over_exponential_noise": bool(same_as_exponential_trick),
            "note": "torch.multinomial(p, 1) on CPU is argmax(p / E) with E = empty_like(p).exponential_(1) drawn "
            "from the default generator (checked step by step when the flag above is true); step_exponential_noise "
            "holds those E so the pick can be replayed without torch's RNG.",
        },
    }
    return info, arrays


def run_convert_tp(env, checkpoint_dir, target_tp, bits, workdir):
    """GLM-130B's tools/convert_tp.py main() on a checkpoint folder; returns the per-rank state dicts."""
    torch = env.torch
    out_dir = os.path.join(workdir, f"tp{target_tp}_int{bits}" if bits else f"tp{target_tp}")
    saved_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # see PATCHES["cuda_on_cpu"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            env.convert_tp.main(
                Namespace(
                    input_folder=checkpoint_dir,
                    output_folder=out_dir,
                    target_tp=target_tp,
                    quantization_bit_width=bits,
                )
            )
    finally:
        torch.Tensor.cuda = saved_cuda
    iteration, _, sds = read_checkpoint_states(out_dir, torch)
    return out_dir, iteration, sds


def read_checkpoint_states(checkpoint_dir, torch):
    with open(os.path.join(checkpoint_dir, "latest")) as f:
        iteration = f.read().strip()
    files = sorted(
        fn
        for fn in os.listdir(os.path.join(checkpoint_dir, iteration))
        if fn.startswith("mp_rank_") and fn.endswith("_model_states.pt")
    )
    sds = []
    for fn in files:
        d = torch.load(os.path.join(checkpoint_dir, iteration, fn), map_location="cpu", weights_only=True)
        assert list(d.keys()) == ["module"], list(d.keys())
        sds.append(d["module"])
    return iteration, files, sds


def convert_case(env, checkpoint_dir, original_sd, target_tp, bits, workdir):
    torch = env.torch
    out_dir, iteration, sds = run_convert_tp(env, checkpoint_dir, target_tp, bits, workdir)
    assert len(sds) == target_tp
    arrays, keys = {}, {}
    for r, sd in enumerate(sds):
        for k, v in sd.items():
            arrays[f"rank{r}/{k}"] = to_np(v)
            keys.setdefault(k, {"dtype": str(v.dtype).replace("torch.", ""), "shape_per_rank": list(v.shape)})
    checks = {"key_order_rank0": list(sds[0].keys())}
    if bits is None:
        # merging the ranks back with convert_tp (target 1) gives the original tensors bit for bit
        _, _, back = run_convert_tp(env, out_dir, 1, None, workdir)
        checks["merge_back_to_tp1_equals_original"] = bool(
            set(back[0]) == set(original_sd) and all(torch.equal(back[0][k], original_sd[k]) for k in original_sd)
        )
    else:
        # dequantised weights vs the unquantised conversion to the same TP degree
        _, _, plain = run_convert_tp(env, checkpoint_dir, target_tp, None, workdir)
        worst = 0.0
        for r, sd in enumerate(sds):
            assert set(sd) == set(plain[r]) | {k + "_scale" for k in sd if k + "_scale" in sd}
            for k, v in sd.items():
                if k + "_scale" in sd:
                    deq = v.float() * sd[k + "_scale"].float()[:, None]
                    worst = max(worst, float((deq - plain[r][k].float()).abs().max()))
                elif not k.endswith("_scale"):
                    assert torch.equal(v, plain[r][k]), k
        checks["dequantized_max_abs_error_vs_unquantized_same_tp"] = worst
        checks["unquantized_tensors_equal_to_unquantized_conversion"] = True
        if target_tp > 1:
            # the scale is taken per output row AFTER the TP split: for the row-parallel matrices
            # (attention.dense, mlp.dense_4h_to_h: split along columns) each rank has its own scales,
            # so int8 at TP k is not the TP split of the int8 TP-1 checkpoint
            _, _, q1 = run_convert_tp(env, checkpoint_dir, 1, bits, workdir)
            same = {}
            for k in sds[0]:
                if k.endswith("_scale"):
                    name = k[: -len("_scale")]
                    if any(name.endswith(x) for x in ("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
                        same[name] = all(torch.equal(sd[k], q1[0][k]) for sd in sds)
            checks["row_parallel_scales_equal_to_int8_tp1_scales"] = same
    info = {
        "kind": "convert_tp",
        "description": (
            "GLM-130B tools/convert_tp.py main(input_folder=sat-tiny checkpoint, target_tp=%d, "
            "quantization_bit_width=%s); each resulting rank's state dict ({'module': sd}) stored as "
            "rank{r}/{key} with the dtypes convert_tp wrote." % (target_tp, bits)
        ),
        "source_tp": 1,
        "target_tp": target_tp,
        "quantization_bit_width": bits,
        "iteration": iteration,
        "keys": keys,
        "checks": checks,
    }
    return info, arrays



# ----------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------
SAT_FILES = [
    "model/official/glm130B_model.py",
    "model/position_embedding/rotary_embeddings.py",
    "model/transformer.py",
    "model/base_model.py",
    "mpu/layers.py",
    "generation/autoregressive_sampling.py",
    "generation/sampling_strategies/base_strategy.py",
]
GLM130B_FILES = [
    "generate.py",
    "evaluation/model.py",
    "generation/strategies.py",
    "tools/convert_tp.py",
]


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def provenance(env, glm130b_commit):
    from importlib import metadata

    sat_root = os.path.dirname(env.sat.__file__)
    return {
        "versions": {
            "SwissArmyTransformer": metadata.version("SwissArmyTransformer"),
            "torch": env.torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "glm130b_commit": glm130b_commit,
        "source_sha256": {
            "SwissArmyTransformer": {f: sha256_file(os.path.join(sat_root, f)) for f in SAT_FILES},
            "GLM-130B": {f: sha256_file(os.path.join(env.glm130b_dir, f)) for f in GLM130B_FILES},
        },
    }


# GLM-130B commit these files were taken from (THUDM/GLM-130B HEAD, 2023-07-25)
KNOWN_GLM130B = {
    "commit": "212215c54f8a9da2deed51455868305235664370",
    "sha256": {
        "generate.py": "a284e770b9b0c293eed17c0e3dc0db8d0b9ba119573d6b108b5f793ba47c5be6",
        "evaluation/model.py": "41f4282dc5e02f8e4da329df34292e8614d0ba0fcf409aa904864b1996f7459e",
        "generation/strategies.py": "a07e772bd0833ee3cbf72e58e56e822eaf9489d0da148600304a6c231f95d087",
        "tools/convert_tp.py": "4b5601e8f7087776e633d9451226e926486186d4cfd60241053e5d6e09634ea1",
    },
}


def known_commit(env):
    """The commit of an export that is not a git work tree, recognised by the sources' hashes."""
    got = {f: sha256_file(os.path.join(env.glm130b_dir, f)) for f in GLM130B_FILES}
    return KNOWN_GLM130B["commit"] if got == KNOWN_GLM130B["sha256"] else None


def git_commit(path):
    """HEAD of `path` when it is the top of a git work tree (not merely inside another repository)."""
    def git(*a):
        return subprocess.run(["git", "-C", path, *a], capture_output=True, text=True, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(path):
            return None
        return git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
CONVENTIONS = {
    "attention_mask": "bool, True = masked (masked_fill -10000.0 before the fp32 softmax), shape [b,1,sq,sk]; "
    "[1,1,s,s] broadcasts over the batch",
    "logits": "[b, s, vocab] batch-first (SAT transposes back in final_forward); float32 for the fp32 model, "
    "float16 (plus a float32 copy, logits_f32) for the fp16 model",
    "hidden_states": "output of each layer, [num_layers, b, s, hidden] (transposed from SAT's [s, b, h])",
    "mem_kv": "SAT KV cache per layer, [num_layers, b, s, 2*hidden]; last dim = [K heads..., V heads...], each "
    "head hn wide, K already rotary-embedded",
    "step_logits_cached": "[b, steps, vocab]: logits handed to the strategy at each generation step (KV-cache path "
    "of batch_filling_sequence; step 0 forwards the whole context)",
    "blank{i}/": "generation cases: arrays of the i-th call of batch_filling_sequence (the i-th blank filled, left "
    "to right); context = ids fed to it (ends with sop), tokens = what it returned (context + generated), "
    "position_ids / attention_mask = generate.get_masks_and_position_ids over context + max_gen_length "
    "(the whole padded length; only the first context+steps-1 are ever forwarded)",
    "generated": "every id the strategy produced for a blank, the end token included when it stopped on one; "
    "blank_ids (cases.json) = what fill_blanks puts in place of the mask (end token dropped)",
    "answer_ids": "fill_blanks' answers[0] (all blanks filled in, trailing eos dropped), as ids",
    "rank{r}/{key}": "convert cases: key of rank r's state dict (mp_rank_{r:02}_model_states.pt['module'])",
    "step{j}/logits": "beam cases: [1, beams at step j, vocab] logits handed to BeamSearchStrategy.forward at step j",
    "answer{r}_ids": "beam cases: fill_blanks' answers[r] as ids (one per returned beam)",
    "step_probs": "sampling cases: [1, steps, vocab] float32, the distribution handed to torch.multinomial",
    "step_exponential_noise": "sampling cases: [1, steps, vocab] float32, the Exp(1) draws E behind "
    "torch.multinomial(p, 1) = argmax(p / E)",
    "ids": "prompts are token ids; raw texts are whitespace-separated ids with [MASK]/[sMASK]/[gMASK] markers; "
    "the tokenizer stand-in maps them 1:1 (tokenize = int(), detokenize = ' '.join)",
}


OBSERVATIONS = [
    "out_seq_length bounds the whole length of each batch_filling_sequence call (context + sop + generated), "
    "not the number of new tokens; a later blank gets less room than an earlier one.",
    "fill_blanks fails (AttributeError: 'int' object has no attribute 'index') when a blank has no room "
    "(out_seq_length <= its context length incl. sop): the loop in batch_filling_sequence never runs, the 2-D "
    "tokens come back and fill_blanks iterates over ints. With a negative budget get_masks_and_position_ids' "
    "F.pad first crops the context.",
    "The text is split on every [MASK]/[sMASK]/[gMASK]; only the chosen kind ([MASK] > [sMASK] > [gMASK]) is "
    "filled, others stay in the sequence as ids. [sMASK] is handled exactly like [MASK]. eos is appended when "
    "the text does not end with a mask; [gMASK] is appended (and no eos) when the text has no mask.",
    "Greedy (BaseStrategy top_k=1) still calls torch.multinomial each step. top_k keeps ties with the k-th "
    "value (logits < kth are removed); filtered logits become -65504, not -inf; temperature divides first; "
    "the softmax handed to multinomial is fp32.",
    "SAT's top-p (top_k_logits) views the logits as 1-D: it only works for batch size 1 (a [2, V] batch "
    "raises). The first token whose cumulative probability exceeds top_p is kept.",
    "torch.multinomial(p, 1) on CPU equals argmax(p / E), E = exponential_(1) drawn from the default "
    "generator; nothing else in a generation step draws from it.",
    "Beam search: candidates are the top (len(end_tokens)+1)*num_beams = 12 of softmax(cumulative scores) "
    "over beams x vocab (topk, deterministic=True), then sorted by score; candidates are taken in order, an end "
    "token becomes an end beam only if it comes before the num_beams-th continuing beam (the loop stops there). "
    "End beams keep the end token. Penalized score = score / ((5 + len) / 6) ** length_penalty with len the "
    "WHOLE sequence (context, sop, generated, end token). finalize(consider_end) adds the live beams with "
    "their own lengths; the list is kept sorted descending, a new equal score goes before the older ones, "
    "truncated to num_beams.",
    "Beam search stops early only when num_beams end beams exist and the worst of them is >= best live score "
    "/ ((5 + current length) / 6) ** lp; in all three beam cases here it runs to out_seq_length.",
    "min_gen_length sets the end tokens' logits to -65504 before log_softmax for the first min_gen_length "
    "steps. no_repeat_ngram_size: bans are keyed on the parent beam's last n-1 tokens (the context and sop "
    "can be part of the key) and only record n-grams generated in this search; they apply once the sequence "
    "is longer than n; banned logits become -65504.",
    "fill_blanks with beams and several masks continues only beam 0 into the next mask; its per-beam "
    "blanks / answers_with_style lists then mix beams of different searches (read from the code; not a case "
    "here).",
    "Attention: q is divided by sqrt(hn) * (layer_id + 1) in the model dtype before q @ k^T, the mask is "
    "applied with masked_fill(-10000) on the model-dtype scores, then float32 and * (layer_id + 1): masked "
    "scores reach the softmax at -10000 * (layer_id + 1). A single query row whose mask is all True skips "
    "the masked_fill (meant as the incremental-decoding fast path).",
    "With the KV cache the logits differ from full recomputation by up to ~1.5e-4 in fp32 (other matmul "
    "shapes); AVX-512 vs AVX2 CPU kernels differ by ~3e-5.",
    "SAT's DeepNormWithGLUMixin always creates mlp.dense_h_to_4h in fp16: an fp32 SAT model cannot run "
    "without casting it (fp32 input x fp16 weight), and loading into it would round the weights to fp16. "
    "The rotary table is fp16 in both modes (inv_freq is created in fp16 and never loaded).",
    "fp16 on CPU: every op of the model has a half kernel in torch 2.13; the fp16 model's logits differ from "
    "the fp32 model's by up to 0.27 on sat-tiny (weights rounded to fp16).",
    "convert_tp: the weight_scale key follows its weight in the state dict; scales are fp16 (absmax / 127 in "
    "the source dtype, then .half()), q = round(w / scale) with round-half-even, computed in the promoted "
    "dtype (fp32 for this fp32 checkpoint, fp16 for GLM-130B's fp16 checkpoints). Scales are taken after the "
    "TP split: for the row-parallel matrices (attention.dense, mlp.dense_4h_to_h) each rank has its own, so "
    "int8 at TP k is not the split of int8 at TP 1. Embeddings, biases and LayerNorms stay unquantized. "
    "dense_h_to_4h is split GLU-wise (rank i holds [x1 chunk i; x2 chunk i]).",
    "generation/strategies.py uses np.bool: it needs numpy >= 2.0 (where np.bool exists again) or < 1.24.",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glm130b", required=True, help="exported GLM-130B repository (work tree)")
    ap.add_argument("--checkpoint", required=True, help="sat-tiny checkpoint folder (latest, model_config.json, ...)")
    ap.add_argument(
        "--reference",
        default=None,
        help="folder with sat-tiny's fwd_gmask.npz and gen_gmask.npz (default: the checkpoint folder's parent)",
    )
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--glm130b-commit", default=None, help="commit of the export (default: git rev-parse in --glm130b)")
    ap.add_argument("--cpu-isa", choices=["avx2", "native"], default="avx2")
    opts = ap.parse_args(argv)

    if opts.reference is None:
        opts.reference = os.path.dirname(os.path.abspath(opts.checkpoint.rstrip(os.sep)))
    env = Env(opts.glm130b, cpu_isa=opts.cpu_isa)
    torch = env.torch
    os.makedirs(opts.out, exist_ok=True)
    iteration, config, sds = read_checkpoint(opts.checkpoint, torch)
    assert len(sds) == 1
    model, _ = build_model(env, config, sds[0], fp16=False)

    verification = verify_reference(env, model, opts.reference)
    print("verification against sat-tiny:", json.dumps(verification, indent=1), flush=True)

    cases = {}
    arrays_of = {}

    def add(name, info_arrays):
        info, arrays = info_arrays
        info = dict(info)
        info["file"] = name + ".npz"
        info["arrays"] = array_desc(arrays)
        cases[name] = info
        arrays_of[name] = arrays
        print("case", name, "done", flush=True)

    add("fwd_mask", case_fwd_mask(env, model))
    add("fwd_causal", case_fwd_causal(env, model))
    gm_tokens = torch.tensor([GMASK_PROMPT + [SPECIAL["[gMASK]"], SPECIAL["sop"]] + FORCED])
    _, gm_mask, gm_pos = env.generate.get_masks_and_position_ids(
        gm_tokens[:, : len(GMASK_PROMPT) + 2], mask_position=len(GMASK_PROMPT), max_gen_length=len(FORCED), gmask=True
    )
    fp32_logits = to_np(run_forward(env, model, gm_tokens, gm_pos, gm_mask)[0])
    add("fwd_fp16", case_fwd_fp16(env, config, sds[0], fp32_logits))

    greedy_desc = (
        "generate.py fill_blanks with GLM-130B's BaseStrategy(batch_size=1, temperature=1, top_k=1) (greedy; "
        "the pick still goes through torch.multinomial on a one-hot distribution) -> evaluation/model.py "
        "batch_filling_sequence with the KV cache. %s"
    )
    add(
        "gen_mask",
        greedy_case(
            env, model, GEN_MASK_TEXT, 64,
            greedy_desc % "One [MASK] in the middle: eos appended after the text; sop and every generated token "
            "take the mask's position; bidirectional context.",
        ),
    )
    add(
        "gen_smask",
        greedy_case(
            env, model, GEN_SMASK_TEXT, 64,
            greedy_desc % "One [sMASK] in the middle: handled exactly as [MASK] (positions frozen at the mask).",
        ),
    )
    add(
        "gen_two_masks",
        greedy_case(
            env, model, GEN_TWO_MASKS_TEXT, 64,
            greedy_desc % "Two [MASK]s: the first is filled, its blank spliced in place of the mask (sop and "
            "end token dropped), then the second is filled over the new sequence (its own call, its own "
            "mask position). out_seq_length bounds each call's total length, so the second blank gets less room.",
        ),
    )

    beam_desc = (
        "generate.py fill_blanks with GLM-130B's BeamSearchStrategy(batch_size=1, num_beams=4, consider_end=True, "
        "end_tokens=[eop, eos], min_gen_length=2, deterministic=True, length_penalty=%s, no_repeat_ngram_size=%s); "
        "fill_blanks args num_beams=4, sampling_strategy=BeamSearchStrategy. answers_ids: fill_blanks' answers "
        "(one per returned beam, in the order returned = descending penalized score). "
        "returned_beams_penalized_scores are the strategy's end_beams_penalized_scores right before finalize() "
        "resets its cache (after consider_end added the live beams); step{j}/logits are the logits handed to "
        "the strategy at step j ([1, beams, V]; 1 beam at step 0), where stored."
    )
    add(
        "beam_gmask",
        beam_case(
            env, model, GEN_GMASK_TEXT, 12, 1.0, 3,
            beam_desc % (1.0, 3) + " No end beam is found during the search here: all 4 come from "
            "finalize(consider_end). Step logits are not stored for this case.",
            store_logits=False,
        ),
    )
    add(
        "beam_mask",
        beam_case(
            env, model, BEAM_MASK_TEXT, 12, 1.0, 3,
            beam_desc % (1.0, 3) + " Here end beams are found during the search and the 3-gram ban changes "
            "the result (same_prompt_other_settings: the run without it).",
            compare=(1.0, 0),
        ),
    )
    add(
        "beam_mask_lp07",
        beam_case(
            env, model, BEAM_LP_TEXT, 12, 0.7, 0,
            beam_desc % (0.7, 0) + " Here the returned set differs from length_penalty=1.0 "
            "(same_prompt_other_settings). Step logits are not stored for this case.",
            compare=(1.0, 0),
            store_logits=False,
        ),
    )

    add(
        "sample_topp",
        sampling_case(
            env, model, GEN_GMASK_TEXT, 10, 0.9, 0, 0.7,
            "fill_blanks with GLM-130B's BaseStrategy(batch_size=1, temperature=0.9, top_k=0, top_p=0.7) after "
            "torch.manual_seed(1234). step_probs = the distribution handed to torch.multinomial (softmax in fp32 "
            "of the temperature-scaled, top-p-filtered logits; filtered entries were set to -65504).",
        ),
    )
    add(
        "sample_topk",
        sampling_case(
            env, model, GEN_GMASK_TEXT, 10, 1.0, 5, 0.0,
            "fill_blanks with GLM-130B's BaseStrategy(batch_size=1, temperature=1.0, top_k=5, top_p=0) after "
            "torch.manual_seed(1234). step_probs as in sample_topp.",
        ),
    )

    import tempfile

    with tempfile.TemporaryDirectory() as work:
        add("convert_tp2", convert_case(env, opts.checkpoint, sds[0], 2, None, work))
        add("convert_tp4", convert_case(env, opts.checkpoint, sds[0], 4, None, work))
        add("convert_int8_tp1", convert_case(env, opts.checkpoint, sds[0], 1, 8, work))
        add("convert_int8_tp2", convert_case(env, opts.checkpoint, sds[0], 2, 8, work))

    for name, arrays in arrays_of.items():
        save_npz(os.path.join(opts.out, name + ".npz"), arrays)

    doc = {
        "generator": "tools/sat_oracle.py",
        "config": {
            k: config[k]
            for k in (
                "num_layers", "hidden_size", "inner_hidden_size", "num_attention_heads", "vocab_size",
                "max_sequence_length", "layernorm_order", "layernorm_epsilon",
            )
        },
        "checkpoint": {"source": "sat-tiny checkpoint/", "iteration": int(iteration), "tp": 1, "dtype": "float32"},
        "special_token_ids": SPECIAL,
        "end_tokens": END_TOKENS,
        **provenance(env, opts.glm130b_commit or git_commit(opts.glm130b) or known_commit(env)),
        "patches": PATCHES,
        "verification_against_sat_tiny": verification,
        "conventions": CONVENTIONS,
        "observations": OBSERVATIONS,
        "not_produced": {
            "convert_int4": "tools/convert_tp.py packs int4 with kernels.compress_int4_weight, a CUDA kernel "
            "(cpm_kernels + fatbin); it cannot run on CPU and is not re-implemented here.",
        },
        "cases": cases,
    }
    with open(os.path.join(opts.out, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print("wrote", len(cases), "cases to", opts.out)


if __name__ == "__main__":
    main()
