"""Train a small byte-level GPT on the Python standard library's source, dense or PA-DST.

    python examples/train_lm.py --structure block --sparsity 0.9 --permutation learned --steps 300
"""

import argparse

import torch

from padst_compiler.models import GPTConfig
from padst_compiler.recipe import RunConfig, label, train
from padst_compiler.training import NM, Block, Diagonal, Unstructured, sparsity_summary

STRUCTURES = {"dense": None, "block": Block(8, 8), "nm": NM(32), "diagonal": Diagonal(), "unstructured": Unstructured()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structure", choices=STRUCTURES, default="block")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--permutation", choices=["learned", "birkhoff", "random", "none"], default="learned")
    parser.add_argument("--growth", choices=["rigl", "set"], default="rigl")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="save model and scheduler state here at the end")
    args = parser.parse_args()

    config = RunConfig(structure=STRUCTURES[args.structure], sparsity=args.sparsity, permutation=args.permutation,
                       growth=args.growth, steps=args.steps, seed=args.seed,
                       model=GPTConfig(d_model=args.d_model, n_layer=args.layers))
    result = train(config)
    if config.structure is not None:
        print(sparsity_summary(result.model))
    print(f"{label(config)}: validation loss {result.validation_loss:.4f} "
          f"(perplexity {result.perplexity:.2f}) after {config.steps} steps in {result.seconds:.0f} s")
    if args.checkpoint:
        torch.save({"model": result.model.state_dict(),
                    "scheduler": result.scheduler.state_dict() if result.scheduler else None}, args.checkpoint)
        print(f"checkpoint written to {args.checkpoint}")


if __name__ == "__main__":
    main()
