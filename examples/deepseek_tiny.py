"""A tiny DeepSeek-V3, built by Hugging Face transformers' own model definition, run on pykernels.

    python examples/deepseek_tiny.py                       # reference and triton backends, one rank
    python examples/deepseek_tiny.py --ranks 2             # the experts split over 2 gloo ranks (ep.Buffer)
    python examples/deepseek_tiny.py --backends emu --layers 1 --experts 4 --batch 1 --prompt 3 --steps 1
    python examples/deepseek_tiny.py --device cuda --backends cuda,triton     # on a Hopper GPU

The model (random weights from a fixed seed, bf16): MLA attention with q_lora_rank 256 and
kv_lora_rank 512 (FlashMLA's latent width; RoPE 64), a dense first layer, then MoE layers of
8 routed experts (3 per token, group-limited: 2 of 4 groups) and a shared expert; widths are
multiples of 128 (the FP8 scale block). It runs a prompt and a few decode steps eagerly, as
transformers defines it, then with pykernels substituted (examples/deepseek_pykernels.py: FP8
linear layers through fp8_gemm_nt, the routed experts through the grouped GEMMs, contiguous
for the prompt and masked for decode steps, MLA decode through flash_mla_with_kvcache over a
paged cache), teacher-forced on the eager run's greedy tokens and, by default, its routing
(each token's experts as eager chose them), so every step compares the same computation.

Why the routing too: a random model's router has near ties, and FP8's ~10% logit noise flips
some of them; a flipped expert moves that token's output by a whole expert's contribution
(free routing: calc_diff up to 8e-2 per step where the same routing gives <= 1.4e-2, 20 seeds).
`--free-routing` shows it. Greedy tokens flip at near ties the same way: untrained logits
over 512 tokens are flat (top-2 gaps ~0.1, FP8 rms noise ~0.1), so FP8 and eager agree on
40-100% of the steps (median 80%, 20 seeds).

Bounds, on calc_diff (1 - 2<x,y>/(|x|^2+|y|^2), DeepGEMM's metric, ~ rel_err^2 / 2) of the
logits of each step, the largest step counted (`check`):

- ATTENTION_VS_EAGER = 2e-4: only the attention substituted (linear layers and experts the
  model's): the absorbed MLA over the paged cache computes what the model's attention does,
  in another rounding order (bf16 absorbed queries); measured <= 8e-5. A decode that misses
  the newest cached token gives 1e-2.
- EXPERTS_VS_EAGER = 2e-3: only the routed experts substituted: their FP8 error alone
  (measured <= 6e-4; DeepGEMM's tests bound one GEMM by 1e-3). Experts fed the wrong rows: 0.2.
- FP8_VS_EAGER = 3e-2: everything substituted. e4m3 keeps 3 mantissa bits: an operand errs
  by <= 2^-4 relative, ~2.3% rms; a product of two ~3.3%, a dot product about the same, so
  one GEMM ~5e-4 in calc_diff; ~14 quantized GEMMs stand between the embeddings and the
  logits here, those feeding attention amplified ~3x by its softmax (measured one by one),
  which sums to ~1e-2; measured 7e-3 to 1.4e-2 (20 seeds); the bound leaves 2x.
- SAME_FP8 = 5e-3: the same substitution on two backends (triton or emu against reference,
  EP against one rank). The GEMMs give the same bits or differ by one bf16 ulp on a few
  elements; the MLA decode's outputs differ in their last bf16 bits (calc_diff ~2e-6 on the
  same inputs, triton against reference). Each such difference that sits at an e4m3 rounding
  boundary of the next layer's cast becomes a whole e4m3 step (6-12%), so the logits differ
  by measured 1.2-1.7e-3 (triton, decode steps; the prompt step bit-equal; 4 seeds), 5e-4
  (emu, one layer), 4e-6 (EP). A decode missing one cached token gives 1-2e-2.

Tokens: where two runs pick different tokens, the reference's logit of the other pick must be
within TIE_MARGIN_RMS = 4 rms logit errors (+ one bf16 step) of its best: a near tie. Against
eager at least EAGER_AGREEMENT = 0.3 of the steps agree (a floor: chance is 1/512); between
FP8 runs SAME_FP8_AGREEMENT = 0.6 (a near tie flips there too).
"""
import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_pykernels import PARTS, Kernels, PagedLatentCache, substitute  # noqa: E402

from pykernels.metrics import calc_diff  # noqa: E402

ATTENTION_VS_EAGER = 2e-4
EXPERTS_VS_EAGER = 2e-3
FP8_VS_EAGER = 3e-2
SAME_FP8 = 5e-3
EAGER_AGREEMENT = 0.3
SAME_FP8_AGREEMENT = 0.6
TIE_MARGIN_RMS = 4.0
# The CPU backends run one program per split-KV partition; pykernels' default is the SM count.
CPU_MLA_SM_PARTS = 2


def tiny_config(layers: int = 2, experts: int = 8) -> DeepseekV3Config:
    """DeepSeek-V3's architecture at a size the CPU runs in seconds: the first layer dense
    (when there are two or more), the others MoE with `experts` routed experts (8: 3 per
    token from 2 of 4 groups; 4: 2 per token from 2 groups). FlashMLA fixes the latent
    (kv_lora_rank 512) and RoPE (64) widths; the FP8 GEMMs need K a multiple of 128."""
    routing = {8: dict(num_experts_per_tok=3, n_group=4, topk_group=2),
               4: dict(num_experts_per_tok=2, n_group=2, topk_group=2)}[experts]
    return DeepseekV3Config(
        vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
        num_hidden_layers=layers, first_k_dense_replace=min(1, layers - 1),
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=256, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
        n_routed_experts=experts, n_shared_experts=1, **routing,
        max_position_embeddings=256, initializer_range=0.05, attn_implementation="eager")


def build_model(config: DeepseekV3Config, seed: int, device="cpu") -> DeepseekV3ForCausalLM:
    """Random weights drawn from `seed` (the same model in every process), bf16, eval mode."""
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


def make_prompt(config, batch: int, length: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)


@dataclass
class Generation:
    logits: torch.Tensor   # float32 [b, steps + 1, vocab]: the prompt's last position, then each decode step
    tokens: torch.Tensor   # int64 [b, steps + 1]: their argmax (the greedy tokens)
    seconds: float
    routing: list = None   # the routers' outputs, in call order (record_routing)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int, cache, feed: torch.Tensor = None) -> Generation:
    """Prefill `prompt` [b, s], then `steps` decode steps; each feeds feed[:, j] when given
    (teacher forcing) or the previous step's argmax."""
    start = time.perf_counter()
    logits = [model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1].float()]
    for j in range(steps):
        token = feed[:, j] if feed is not None else logits[-1].argmax(-1)
        logits.append(model(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1].float())
    logits = torch.stack(logits, dim=1)
    return Generation(logits, logits.argmax(-1), time.perf_counter() - start)


def routers(model):
    return [m for m in model.modules() if isinstance(m, hf.DeepseekV3TopkRouter)]


def record_routing(model) -> list:
    """Forward hooks that append each router's output (logits, weights, expert ids) to the
    returned list, in call order."""
    calls = []
    for router in routers(model):
        router.register_forward_hook(lambda mod, args, out: calls.append(out))
    return calls


def replay_routing(model, calls: list):
    """Forward hooks that make the routers return `calls` (record_routing's list) in order:
    the experts chosen as the recorded run chose them."""
    replay = iter(calls)
    for router in routers(model):
        router.register_forward_hook(lambda mod, args, out: next(replay))


def run_eager(config, prompt, steps: int, seed: int) -> Generation:
    model = build_model(config, seed, prompt.device)
    routing = record_routing(model)
    run = generate(model, prompt, steps, DynamicCache(config=config))
    run.routing = routing
    return run


def run_pykernels(config, prompt, steps: int, seed: int, kernels: Kernels, eager: Generation, buffer=None,
                  parts=PARTS, same_routing=True) -> Generation:
    """The substituted model teacher-forced on eager's tokens; same_routing: also on its
    routing (the experts of each token as eager chose them)."""
    model = substitute(build_model(config, seed, prompt.device), kernels, buffer, parts)
    if same_routing:
        replay_routing(model, eager.routing)
    cache = PagedLatentCache(config, prompt.shape[0], prompt.shape[1] + steps, kernels, prompt.device, seed)
    return generate(model, prompt, steps, cache, eager.tokens)


def compare(test: Generation, ref: Generation) -> dict:
    """calc_diff of all logits and per step; greedy-token agreement; whether every differing
    token is a near tie: ref's best logit minus ref's logit of test's token <= TIE_MARGIN_RMS
    rms logit errors + one bf16 step of the best logit (the logits are bf16)."""
    err = test.logits - ref.logits
    rms = float(err.pow(2).mean().sqrt())
    same = test.tokens == ref.tokens
    best = ref.logits.max(-1).values
    picked = ref.logits.gather(-1, test.tokens[..., None])[..., 0]
    allowed = TIE_MARGIN_RMS * rms + best.abs() * 2.0 ** -7
    return dict(calc_diff=calc_diff(test.logits, ref.logits),
                per_step=[calc_diff(test.logits[:, j], ref.logits[:, j]) for j in range(ref.logits.shape[1])],
                agreement=float(same.float().mean()), rms=rms,
                worst_margin=float((best - picked)[~same].max()) if (~same).any() else 0.0,
                near_ties=bool((best - picked <= allowed)[~same].all()))


def check(result: dict, bound: float, agreement: float) -> list:
    """The failed rules of one comparison (empty when it passes): the largest step's
    calc_diff <= bound, token agreement >= agreement, every differing token a near tie."""
    failed = []
    if not max(result["per_step"]) <= bound:
        failed.append(f"calc_diff {max(result['per_step']):.2e} > {bound:.0e} at a step")
    if result["agreement"] < agreement:
        failed.append(f"token agreement {result['agreement']:.2f} < {agreement}")
    if not result["near_ties"]:
        failed.append(f"a differing token is no near tie: margin {result['worst_margin']:.3f} > "
                      f"{TIE_MARGIN_RMS} x rms {result['rms']:.3f}")
    return failed


def default_kernels(backend: str, device) -> Kernels:
    """On a GPU, every op on `backend`; on the CPU, the casts on the reference (bit for bit
    what every backend casts) and a 2-part MLA schedule (one interpreted program per part)."""
    if str(device).startswith("cuda"):
        return Kernels(backend, poison=True)
    return Kernels(backend, cast_backend="reference", mla_sm_parts=CPU_MLA_SM_PARTS, poison=True)


def run_one_rank(backends, layers=2, experts=8, batch=2, prompt_len=61, steps=4, seed=0, device="cpu",
                 isolate=True, same_routing=True) -> dict:
    """Eager, then the whole substitution on each backend. isolate: also the attention alone
    and the experts alone on the first backend ("attention", "experts"). The default prompt
    of 61 tokens and 4 steps cross the first 64-token page. Returns {name: Generation}."""
    config = tiny_config(layers, experts)
    prompt = make_prompt(config, batch, prompt_len, seed + 1, device)
    runs = {"eager": run_eager(config, prompt, steps, seed)}
    for part in (("attention", "experts") if isolate else ()):
        runs[part] = run_pykernels(config, prompt, steps, seed, default_kernels(backends[0], device), runs["eager"],
                                   parts=(part,), same_routing=same_routing)
    for backend in backends:
        runs[backend] = run_pykernels(config, prompt, steps, seed, default_kernels(backend, device), runs["eager"],
                                      same_routing=same_routing)
    return runs


def one_rank_checks(runs: dict, backends) -> dict:
    """{comparison name: (compare result, failed rules)} for run_one_rank's runs."""
    rules = {"attention": ATTENTION_VS_EAGER, "experts": EXPERTS_VS_EAGER}
    out = {}
    for name, bound in rules.items():
        if name in runs:
            res = compare(runs[name], runs["eager"])
            out[f"{name} only ({backends[0]}) vs eager"] = (res, check(res, bound, EAGER_AGREEMENT))
    for b in backends:
        res = compare(runs[b], runs["eager"])
        out[f"{b} vs eager"] = (res, check(res, FP8_VS_EAGER, EAGER_AGREEMENT))
    for b in backends[1:]:
        res = compare(runs[b], runs[backends[0]])
        out[f"{b} vs {backends[0]}"] = (res, check(res, SAME_FP8, SAME_FP8_AGREEMENT))
    return out


def ep_checks(run: dict) -> dict:
    """{comparison name: (compare result, failed rules)} for one rank of run_ranks."""
    vs_eager, vs_one = compare(run["ep"], run["eager"]), compare(run["ep"], run["one_rank"])
    return {"EP vs eager": (vs_eager, check(vs_eager, FP8_VS_EAGER, EAGER_AGREEMENT)),
            "EP vs one rank": (vs_one, check(vs_one, SAME_FP8, SAME_FP8_AGREEMENT))}


def _ep_worker(rank, ranks, store, out_dir, backend, layers, experts, batch, prompt_len, steps, seed):
    """One rank: its own prompts (data-parallel attention), the experts split over the ranks."""
    import torch.distributed as dist
    from pykernels.ep import Buffer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    try:
        config = tiny_config(layers, experts)
        prompt = make_prompt(config, batch, prompt_len, seed + 1 + rank)
        eager = run_eager(config, prompt, steps, seed)
        kernels = default_kernels(backend, "cpu")
        ep = run_pykernels(config, prompt, steps, seed, kernels, eager, Buffer(dist.group.WORLD))
        single = run_pykernels(config, prompt, steps, seed, default_kernels(backend, "cpu"), eager)
        per_rank = experts // ranks
        remote = sum(int((ids // per_rank != rank).sum()) for _, _, ids in eager.routing)
        saved = {name: (g.logits, g.tokens, g.seconds) for name, g in (("eager", eager), ("ep", ep),
                                                                       ("one_rank", single))}
        torch.save(dict(saved, remote_pairs=remote), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(ranks=2, backend="reference", layers=2, experts=8, batch=2, prompt_len=61, steps=4, seed=0) -> list:
    """The EP run over `ranks` gloo processes. Per rank: {"eager", "ep", "one_rank"}
    Generations ("one_rank": the same FP8 substitution with every expert local) and
    "remote_pairs", how many (token, expert) pairs of its tokens were computed on another rank."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ep_worker, args=(ranks, os.path.join(d, "store"), d, backend, layers, experts, batch, prompt_len,
                                   steps, seed), nprocs=ranks, join=True)
        saved = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(ranks)]
    return [{name: (Generation(*g) if isinstance(g, tuple) else g) for name, g in s.items()} for s in saved]


def _report(checks: dict) -> bool:
    ok = True
    for name, (result, failed) in checks.items():
        steps = " ".join(f"{d:.1e}" for d in result["per_step"])
        status = "ok" if not failed else "FAILED: " + "; ".join(failed)
        print(f"  {name:<32} calc_diff per step {steps}; tokens agree {result['agreement']:.0%}: {status}")
        ok &= not failed
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="reference,triton", help="comma-separated pykernels backends")
    p.add_argument("--ranks", type=int, default=1, help="> 1: the experts over that many gloo ranks (first backend)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8, choices=(4, 8))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=61)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--free-routing", action="store_true",
                   help="the FP8 model routes by its own scores (the bounds assume eager's routing)")
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    if args.ranks > 1:
        runs = run_ranks(args.ranks, backends[0], args.layers, args.experts, args.batch, args.prompt, args.steps,
                         args.seed)
        ok = True
        for r, run in enumerate(runs):
            print(f"rank {r}: eager {run['eager'].seconds:.1f} s, EP {run['ep'].seconds:.1f} s, "
                  f"{run['remote_pairs']} (token, expert) pairs on another rank")
            ok &= _report(ep_checks(run))
        return 0 if ok else 1
    runs = run_one_rank(backends, args.layers, args.experts, args.batch, args.prompt, args.steps, args.seed,
                        args.device, same_routing=not args.free_routing)
    for name, run in runs.items():
        print(f"{name}: {run.seconds:.1f} s; greedy tokens {run.tokens.tolist()}")
    return 0 if _report(one_rank_checks(runs, backends)) else 1


if __name__ == "__main__":
    sys.exit(main())
