"""`kdsl serve CHECKPOINT`: an OpenAI-style completion server on 127.0.0.1 (the [serve] extra)."""

from __future__ import annotations

from dsl.errors import KdslError
from runtime.cli.common import add_slo_arguments, slo_from_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-style HTTP API",
                       description="Serve a `kdsl train` run directory (or a random preset model) with "
                                   "continuous batching and a paged KV cache: POST /v1/completions, "
                                   "GET /v1/models, /health, /metrics.")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="training run directory (holds checkpoint.json); omit with --random-init")
    p.add_argument("--preset", default="tiny", help="model preset for --random-init (default: tiny)")
    p.add_argument("--random-init", action="store_true",
                   help="serve a randomly initialised --preset model with a byte tokenizer (for trying it out)")
    p.add_argument("--quant", default="none", choices=["none", "w4", "w8"],
                   help="quantize the linear layers' weights (default: none)")
    p.add_argument("--scheduler", default="past-future",
                   help="aggressive | conservative | past-future | layered-prefill (default: past-future)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--num-blocks", type=int, default=512, help="KV cache blocks (default: 512)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit, prompt + output tokens (default: the KV cache capacity)")
    p.add_argument("--max-tokens-limit", type=int, default=512,
                   help="largest max_tokens a request may ask for (default: 512)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "triton"],
                   help="kernel backend of the model's ops (default: torch)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_slo_arguments(p, abort_help="drop a request (HTTP 503, or finish_reason 'abort' when streaming) as "
                                    "soon as it misses the SLO, to keep serving the others under overload")
    p.add_argument("--model-name", default=None, help="model id in the API (default: from the checkpoint)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from runtime.serve.http import ServerLimits, serve
    except ImportError as exc:
        raise KdslError(f"serving needs the [serve] extra ({exc.name} is missing): "
                        "pip install 'kdsl[serve]'") from None
    from runtime.serve.engine import Engine
    from runtime.serve.loading import load_checkpoint, quantize_for_serving, random_model

    if args.random_init:
        if args.checkpoint:
            raise KdslError("give either CHECKPOINT or --random-init, not both")
        model, tokenizer, name = random_model(args.preset, backend=args.backend)
        print(f"kdsl serve: serving a RANDOMLY INITIALISED '{args.preset}' model (its output is noise)")
    elif args.checkpoint:
        model, tokenizer, name = load_checkpoint(args.checkpoint, backend=args.backend)
        if tokenizer is None:
            print("kdsl serve: no tokenizer.json found; prompts must be token id lists")
    else:
        raise KdslError("give a CHECKPOINT (a `kdsl train` run directory) or --random-init")
    done = quantize_for_serving(model, args.quant)
    if args.quant != "none":
        print(f"kdsl serve: --quant {args.quant}: {done['packed']} layers packed (QuantLinear), "
              f"{done['simulated']} fused weights rounded to the {args.quant} grid and kept dequantized")
    model = model.to(args.device)
    engine = Engine(model, tokenizer, scheduler=args.scheduler, num_blocks=args.num_blocks,
                    block_size=args.block_size, max_model_len=args.max_model_len, device=args.device,
                    abort_missed=slo_from_args(args) if args.abort_missed else None)
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit)
    print(f"kdsl serve: model '{args.model_name or name}' on http://{args.host}:{args.port} "
          f"({args.scheduler}, {args.num_blocks} x {args.block_size} KV slots)")
    serve(engine, host=args.host, port=args.port, model_name=args.model_name or name, limits=limits)
    return 0
