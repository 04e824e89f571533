"""``python -m minikernels.distributed.selfcheck``: tensor parallel with decode CUDA graphs
gives the tokens of the same tensor-parallel model run eagerly (needs N GPUs).

Both engines load the same shards (same model, seed and N), so greedy tokens match up to
the rounding of graphs (padded batch buckets) vs eager kernels; the check prints how many
requests match and exits 1 when fewer than ``--min-match`` do (or on a hang / error).
"""
from __future__ import annotations

import argparse
import sys


def _tokens(model: str, n: int, eager: bool, args: argparse.Namespace) -> list[list[int]]:
    import minikernels as mk

    llm = mk.LLM(model, tensor_parallel_size=n, dtype=args.dtype, device=args.device,
                 enforce_eager=eager, max_num_seqs=16, max_model_len=512, tokenizer=None)
    try:
        runner = llm.llm_engine.runner
        print(f"tp={n} eager={eager}: cuda graphs {runner.graphs is not None}")
        vocab = llm.llm_engine.vocab_size
        prompts = [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(8 + 5 * i)]
                   for i in range(12)]
        params = mk.SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                   ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    finally:
        llm.llm_engine.model.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minikernels.distributed.selfcheck",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b", help="name or directory")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda", help="cpu runs both eagerly (a dry run)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--min-match", type=float, default=0.75,
                   help="fraction of requests whose tokens must match exactly (a random "
                        "model's near-tied logits may flip a token: graphs run a padded "
                        "batch, whose kernels may round differently)")
    args = p.parse_args(argv)
    graphs = _tokens(args.model, args.tensor_parallel_size, False, args)
    eager = _tokens(args.model, args.tensor_parallel_size, True, args)
    same = sum(a == b for a, b in zip(graphs, eager))
    print(f"graphs == eager for {same}/{len(eager)} requests")
    return 0 if same >= args.min_match * len(eager) else 1


if __name__ == "__main__":
    sys.exit(main())
