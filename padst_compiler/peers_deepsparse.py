"""DeepSparse side of ``padst bench peers``: runs in DeepSparse's own environment (numpy 1.26,
onnx 1.14, no torch), so it imports nothing from padst_compiler.

Protocol, one JSON object per line: the first line read is the setup (``d``, ``hidden``,
``sparsity``, ``tokens``, ``seed``, ``folder``); it answers ``{"ready": version}`` once every
engine is compiled. Each later line ``{"variant": "dense" | "sparse", "tokens": n, "calls": k}``
is answered with ``{"seconds": s}``, the wall time of k engine calls; ``{"quit": true}`` ends
it. Anything that fails is answered with ``{"error": message}``.
"""

import json
import os
import sys
import time


def mlp_model(d, hidden, tokens, sparsity, seed):
    """``x [tokens, d] -> GELU(x W1 + b1) W2 + b2`` in ONNX (erf GELU, as ``F.gelu``), each
    weight magnitude-pruned to ``sparsity`` (unstructured)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32)
    for weight in (w1, w2):
        if sparsity:
            weight[np.abs(weight) < np.quantile(np.abs(weight), sparsity)] = 0
    constants = {"w1": w1, "b1": np.zeros(hidden, np.float32), "w2": w2, "b2": np.zeros(d, np.float32),
                 "inv_sqrt2": np.array(0.5 ** 0.5, np.float32), "half": np.array(0.5, np.float32),
                 "one": np.array(1.0, np.float32)}
    nodes = [("MatMul", ["x", "w1"], "h"), ("Add", ["h", "b1"], "a"), ("Mul", ["a", "inv_sqrt2"], "s"),
             ("Erf", ["s"], "e"), ("Add", ["e", "one"], "e1"), ("Mul", ["a", "e1"], "g0"),
             ("Mul", ["g0", "half"], "g"), ("MatMul", ["g", "w2"], "m"), ("Add", ["m", "b2"], "y")]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, [output]) for op, inputs, output in nodes], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, d])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def main():
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

    def reply(**message):
        replies.write(json.dumps(message) + "\n")

    try:
        import deepsparse
        import numpy as np
        import onnx

        setup = json.loads(sys.stdin.readline())
        engines, inputs = {}, {}
        for tokens in setup["tokens"]:
            inputs[tokens] = [np.random.default_rng(tokens).standard_normal((tokens, setup["d"])).astype(np.float32)]
            for variant, sparsity in (("dense", 0.0), ("sparse", setup["sparsity"])):
                path = os.path.join(setup["folder"], f"mlp_{variant}_{tokens}.onnx")
                onnx.save(mlp_model(setup["d"], setup["hidden"], tokens, sparsity, setup["seed"]), path)
                engines[variant, tokens] = deepsparse.compile_model(path, batch_size=tokens)
        reply(ready=deepsparse.__version__)
    except Exception as error:  # noqa: BLE001 - reported to the benchmark, which goes on without DeepSparse
        reply(error=f"{type(error).__name__}: {error}")
        return
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            return
        try:
            engine, x = engines[request["variant"], request["tokens"]], inputs[request["tokens"]]
            start = time.perf_counter()
            for _ in range(request["calls"]):
                engine(x)
            reply(seconds=time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001
            reply(error=f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
