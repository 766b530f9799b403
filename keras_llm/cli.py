"""The `keras-llm` command line.

    keras-llm generate --model smollm2 --prompt "..." [--chat] [--json] ...
    keras-llm generate --model my_lm.keras --custom-objects my_layers --tokenizer tokenizer.json ...
    keras-llm tokenize --model smollm2 --text "..." [--json]
    keras-llm export --model smollm2 --model_base_path DIR --model_name NAME
    keras-llm import --model FILE.gguf --output DIR
    keras-llm optimize --model smollm2 --output DIR --report R.json --prune 0.5 ...
    keras-llm serve --port 8500 --model_name NAME --model_base_path DIR
    keras-llm chat --target 127.0.0.1:8500 [--system "..."]
    keras-llm bench [--model smollm2] [--engines ...] [--repeats N] [--output DIR] [--quick]

Bad input ends with a one-line error on stderr and exit status 2; nothing
prints a traceback unless KERAS_LLM_DEBUG=1. Every command but `serve` keeps
TensorFlow's and LiteRT's native log lines out of the output unless
`--verbose` is given.
"""

import argparse
import contextlib
import json
import os
import sys

from keras_llm.runtime.speculative import SPECULATIVE_TOKENS


class UsageError(Exception):
    """A user mistake: reported in one line."""


def _positive_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _int_list(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def _lengths(text, max_length):
    """`--litert-lengths`: unset (None: the default), "auto" (128, 256, ...
    below 3/4 of the max length), "none" (no shorter caches) or a list."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        from keras_llm.litert import default_lengths  # pylint: disable=import-outside-toplevel
        return default_lengths(max_length or 1024)
    if text.strip().lower() == "none":
        return ()
    return _int_list(text, "--litert-lengths")


def _add_model(parser):
    parser.add_argument("--model", default="smollm2",
                        help="preset name (smollm2), model directory, .keras/.h5 or .gguf file")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json for a bare .keras/.h5 file, keras-llm's or Hugging "
                             "Face's (default: beside it; none: ids only)")
    parser.add_argument("--custom-objects", dest="custom_objects", default=None,
                        help="module (importable name or .py file) that registers the model's "
                             "own layers, or exposes a custom_objects dict")
    parser.add_argument("--unsafe", action="store_true",
                        help="allow model files that run Python code on load (Lambda layers)")


def _add_draft(parser):
    parser.add_argument("--draft", default=None,
                        help="speculative decoding: a draft model guesses the next tokens and "
                             "the model checks several at once (same output, faster at batch "
                             "1): int4 or int8 (the model's own weights in that precision) or "
                             "another model with the same vocabulary")
    parser.add_argument("--speculative-tokens", dest="speculative_tokens", type=_positive_int,
                        default=SPECULATIVE_TOKENS,
                        help="draft tokens checked per step (with --draft; at most 7)")


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-llm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text for a prompt")
    _add_model(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--system", default=None, help="system message for --chat")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=_positive_int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[],
                     help="a string that ends the answer (repeatable)")
    gen.add_argument("--backend", choices=("auto", "litert", "xla"), default="auto",
                     help="auto: the model's LiteRT file (built once, kept beside the model), "
                          "else XLA")
    _add_draft(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--verbose", action="store_true",
                     help="show TensorFlow's and LiteRT's native log lines (any command)")

    tok = commands.add_parser("tokenize", help="print the token ids of a text")
    _add_model(tok)
    tok.add_argument("--text", required=True)
    tok.add_argument("--chat", action="store_true")
    tok.add_argument("--json", action="store_true")

    exp = commands.add_parser("export", help="write a SavedModel in TF Serving layout")
    _add_model(exp)
    exp.add_argument("--model_base_path", "--model-base-path", dest="model_base_path",
                     required=True)
    exp.add_argument("--model_name", "--model-name", dest="model_name", required=True)
    exp.add_argument("--version", type=int, default=None,
                     help="version number (default: the next free one)")
    exp.add_argument("--max-new-tokens", type=_positive_int, default=128)
    exp.add_argument("--xla", dest="xla", action="store_true", default=True,
                     help="XLA-compile the decode loop (default; TF Serving then needs "
                          "--xla_cpu_compilation_enabled)")
    exp.add_argument("--no-xla", dest="xla", action="store_false")
    exp.add_argument("--chat", action="store_true",
                     help="apply the chat template to string prompts inside the graph")
    exp.add_argument("--no-warmup", dest="warmup", action="store_false")
    exp.add_argument("--litert", choices=("auto", "float32", "float16", "int8", "int4"),
                     default="auto",
                     help="precision of the LiteRT file keras-llm serve decodes with (auto: "
                          "int8 or int4 for a model quantized so, else float32)")
    exp.add_argument("--no-litert", dest="litert", action="store_const", const=None,
                     help="leave the LiteRT file out (the server then decodes with XLA)")
    exp.add_argument("--litert-batch-sizes", default=None,
                     help="decode batch sizes of the LiteRT file (largest = server slots; "
                          "default 1,4,16)")
    exp.add_argument("--litert-max-length", type=_positive_int, default=None,
                     help="cache positions per sequence in the LiteRT file (default 1024)")
    exp.add_argument("--litert-lengths", default=None,
                     help="shorter decode caches in the LiteRT file, e.g. 128,256 (default 256; "
                          "auto: 128, 256, ... below 3/4 of the max length; none: no others)")

    for name, text in (("client", "send one prompt to a keras-llm server"),
                       ("chat", "chat with a keras-llm server in the terminal")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--target", default="127.0.0.1:8500",
                         help="host:port of the server; several, comma-separated, or "
                              "dns:///NAME:PORT to balance over replicas")
        sub.add_argument("--model_name", "--model-name", dest="model_name", default="")
        sub.add_argument("--max-new-tokens", type=_positive_int, default=256)
        sub.add_argument("--temperature", type=float, default=0.0)
        sub.add_argument("--top-k", type=_positive_int, default=0)
        sub.add_argument("--top-p", type=float, default=1.0)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--timeout", type=float, default=300.0)
        sub.add_argument("--api_key", "--api-key", dest="api_key",
                         default=os.environ.get("KERAS_LLM_API_KEY"),
                         help="the server's API key (default: $KERAS_LLM_API_KEY)")
        sub.add_argument("--ca_cert", "--ca-cert", dest="ca_cert", default=None,
                         help="PEM file of the CA that signed the server's certificate (TLS)")
        sub.add_argument("--client_cert", "--client-cert", dest="client_cert", default=None,
                         help="PEM client certificate (servers with client_verify)")
        sub.add_argument("--client_key", "--client-key", dest="client_key", default=None)
        if name == "client":
            sub.add_argument("--prompt", required=True)
            sub.add_argument("--chat", action="store_true")
            sub.add_argument("--predict", action="store_true",
                             help="use TF Serving's Predict (serving_default) instead of streaming")
            sub.add_argument("--json", action="store_true")
        else:
            sub.add_argument("--system", default="",
                             help="system message that starts the conversation")

    commands.add_parser("bench", help="benchmark keras-llm against its competitors (the suite "
                        "in the repository's benchmarks/; keras-llm bench --help)")

    imp = commands.add_parser("import", help="import a GGUF file or a Hugging Face checkpoint "
                                             "directory into a model directory")
    imp.add_argument("--model", required=True,
                     help="the .gguf file, or a Hugging Face directory (config.json, "
                          "*.safetensors, tokenizer.json)")
    imp.add_argument("--output", required=True, help="model directory to write")

    opt = commands.add_parser("optimize", help="prune, quantize, distill or cast a model; "
                                                "write it and a report")
    _add_model(opt)
    opt.add_argument("--output", required=True, help="model directory to write")
    opt.add_argument("--report", required=True, help="JSON report path (Markdown beside it)")
    opt.add_argument("--prune", type=float, default=None, help="target sparsity, e.g. 0.5")
    opt.add_argument("--structure", default="unstructured", help="unstructured or 2:4")
    opt.add_argument("--prune-method", default="sparsegpt",
                     help="sparsegpt (default), wanda (both one-shot on teacher text) or "
                          "magnitude")
    opt.add_argument("--calibration-sequences", type=_positive_int, default=128,
                     help="teacher-text sequences SparseGPT and Wanda calibrate on")
    opt.add_argument("--recovery-steps", type=_positive_int, default=0,
                     help="fine-tune steps after pruning (and QAT steps)")
    opt.add_argument("--quantize", default=None,
                     help="int8 (post-training), qat, or int4 (4-bit LiteRT weights by blocks "
                          "of 32: a Q4_1 GGUF's own codes)")
    opt.add_argument("--distill-layers", type=int, default=None,
                     help="student layers (at most half the teacher's)")
    opt.add_argument("--distill-steps", type=_positive_int, default=0)
    opt.add_argument("--dtype", default=None, help="float16 or bfloat16")
    opt.add_argument("--eval-tokens", type=_positive_int, default=4096)
    opt.add_argument("--train-tokens", type=_positive_int, default=16384)
    opt.add_argument("--no-speed", dest="speed", action="store_false",
                     help="skip the decode tokens/s measurements")
    opt.add_argument("--logdir", default=None,
                     help="checkpoints, TensorBoard scalars, training backups, teacher-text "
                          "cache")
    opt.add_argument("--batch-size", type=_positive_int, default=4,
                     help="global training batch (split over all replicas and workers)")
    opt.add_argument("--sequence-length", type=_positive_int, default=128,
                     help="training sequence length")
    opt.add_argument("--strategy", default="auto",
                     help="auto (every local GPU, else the CPU), mirrored, or multi_worker "
                          "(every worker of the TF_CONFIG cluster runs this command)")
    opt.add_argument("--backup-dir", default=None,
                     help="where the recovery fine-tune and QAT back up their state "
                          "(default LOGDIR/backup); a restarted run resumes from it")
    opt.add_argument("--backup-every", type=_positive_int, default=50,
                     help="training steps between backups")
    return parser


def custom_objects(spec):
    """Import `--custom-objects`: a module name (found from the current
    directory too, as `python -m` would) or a `.py` file. Importing it
    registers the user's layers; its `custom_objects` dict, if any, is
    returned for `load_model`."""
    import importlib  # pylint: disable=import-outside-toplevel
    import importlib.util  # pylint: disable=import-outside-toplevel

    if spec is None:
        return None
    if os.path.isfile(spec):
        name = os.path.splitext(os.path.basename(spec))[0]
        module_spec = importlib.util.spec_from_file_location(name, spec)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(spec)
        except ImportError as error:
            raise UsageError(f"--custom-objects {spec}: cannot import it ({error})") from None
    objects = getattr(module, "custom_objects", None)
    if objects is not None and not isinstance(objects, dict):
        raise UsageError(f"--custom-objects {spec}: its custom_objects is not a dict")
    return objects


def _load(args, **options):
    from keras_llm.language_model import load  # pylint: disable=import-outside-toplevel

    return load(args.model, safe_mode=not args.unsafe, tokenizer=args.tokenizer,
                custom_objects=custom_objects(args.custom_objects), **options)


def cmd_generate(args):
    from keras_llm.language_model import LanguageModel  # pylint: disable=import-outside-toplevel

    if not args.prompt:
        raise UsageError("empty prompt")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    LanguageModel.sampling_params(**sampling)  # validate before any work
    lm = _load(args, backend=args.backend, max_slots=1, draft=args.draft,
               speculative_tokens=args.speculative_tokens)
    prompt_ids = lm.encode(args.prompt, chat=args.chat, system=args.system)
    completion = None
    for item in lm.stream(prompt_ids, **sampling):
        if isinstance(item, tuple):
            if not args.json:
                sys.stdout.write(item[0])
                sys.stdout.flush()
        else:
            completion = item
    if args.json:
        record = {
            "model": args.model,
            "text": completion.text,
            "token_ids": completion.token_ids,
            "prompt_token_ids": completion.prompt_token_ids,
            "finish_reason": completion.finish_reason,
            "time_to_first_token_s": round(completion.time_to_first_token_s, 6),
            "decode_tokens_per_s": round(completion.decode_tokens_per_s, 3),
            "compile_s": round(completion.compile_s, 3),
        }
        if lm.engine.speculator is not None:
            record["speculative"] = lm.engine.speculator.stats()
        print(json.dumps(record, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


def cmd_tokenize(args):
    tokenizer = _tokenizer_only(args.model, args)
    text = tokenizer.apply_chat_template(args.text) if args.chat else args.text
    ids = tokenizer.encode(text)
    if args.json:
        print(json.dumps({"ids": ids}))
    else:
        print(" ".join(str(i) for i in ids))


def _tokenizer_only(spec, args):
    """Load just the tokenizer of a preset or model directory (no TensorFlow)."""
    from keras_llm import presets  # pylint: disable=import-outside-toplevel
    from keras_llm.language_model import load  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime import artifacts  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.tokenizer import HostTokenizer  # pylint: disable=import-outside-toplevel

    directory = presets.preset_dir(spec) if spec in presets.PRESETS else spec
    if artifacts.is_model_dir(directory):
        return HostTokenizer.load(directory)
    tokenizer = _load(args).host_tokenizer
    if tokenizer is None:
        raise UsageError(f"{spec} has no tokenizer: pass --tokenizer FILE")
    return tokenizer


def cmd_import(args):
    from keras_llm import gguf_import, hf_import, saving  # pylint: disable=import-outside-toplevel

    read = hf_import.load_hf if hf_import.is_hf_dir(args.model) else gguf_import.load_gguf
    model, tokenizer, metadata = read(args.model)
    if tokenizer is None:
        raise UsageError(f"{args.model}: its tokenizer cannot run in keras-llm "
                         f"({metadata.get('tokenizer_unsupported', 'none found')}); "
                         "generate from it directly with --model DIR (ids only)")
    path = saving.save_model_dir(args.output, model, tokenizer, metadata)
    print(path)


def _sampling(args):
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _client(args):
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel

    def read(path):
        if not path:
            return None
        with open(path, "rb") as handle:
            return handle.read()

    return Client(args.target, timeout=args.timeout, api_key=args.api_key,
                  root_certificates=read(args.ca_cert), private_key=read(args.client_key),
                  certificate_chain=read(args.client_cert))


def cmd_client(args):
    if not args.prompt:
        raise UsageError("empty prompt")
    with _client(args) as client:
        if args.predict:
            outputs = client.predict(args.model_name, [args.prompt])
            text = outputs["text"][0].decode("utf-8", errors="replace")
            print(json.dumps({"text": text}, ensure_ascii=False) if args.json else text)
            return
        for delta in client.stream(args.prompt, chat=args.chat, model_name=args.model_name,
                                   **_sampling(args)):
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
        s = client.last_summary
        if args.json:
            print(json.dumps({"text": s.text, "token_ids": list(s.token_ids),
                              "finish_reason": s.finish_reason,
                              "time_to_first_token_s": s.time_to_first_token_s,
                              "total_s": s.total_s}, ensure_ascii=False))
        else:
            sys.stdout.write("\n")


def cmd_chat(args):
    """A conversation with a server: every turn sends the whole conversation
    (`--system` first) as messages, which the server renders with the model's
    chat template; `/reset` starts a new conversation."""
    conversation = []  # user and assistant turns, alternating
    with _client(args) as client:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return
            if not line:
                continue
            if line == "/reset":
                conversation.clear()
                print("(new conversation)")
                continue
            conversation.append({"role": "user", "content": line})
            reply = chat_turn(client, conversation, args.system, model_name=args.model_name,
                              **_sampling(args))
            conversation.append({"role": "assistant", "content": reply})
            sys.stdout.write("\n")


def chat_turn(client, conversation, system="", out=None, **request):
    """Streams the answer to `conversation` (ending with the user's new turn)
    to `out` after a `model> ` prompt and returns its text.

    When the server answers INVALID_ARGUMENT because the conversation plus
    `max_new_tokens` exceeds its per-sequence limit, the oldest user/assistant
    pair is removed from `conversation` (in place; the system message stays)
    and the request sent again, with a one-line note on stderr.
    """
    out = sys.stdout if out is None else out
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0

    def start():
        if dropped:
            print(f"keras-llm: dropped the oldest {dropped} exchange(s) of the conversation "
                  "to fit the server's limit", file=sys.stderr, flush=True)
        out.write("model> ")

    while True:
        pieces = []
        try:
            for delta in client.stream(messages=head + conversation, **request):
                if not pieces:
                    start()
                pieces.append(delta)
                out.write(delta)
                out.flush()
        except Exception as error:  # pylint: disable=broad-except
            if pieces or len(conversation) < 3 or not _too_long(error):
                raise
            del conversation[:2]
            dropped += 1
            continue
        if not pieces:
            start()
        return "".join(pieces)


def _too_long(error):
    """Whether a gRPC error says the prompt does not fit the server's limit."""
    if not (hasattr(error, "code") and hasattr(error, "details")):
        return False
    return (error.code().name == "INVALID_ARGUMENT"
            and "exceeds" in (error.details() or "").lower())


def cmd_export(args):
    from keras_llm.export.saved_model import export_model  # pylint: disable=import-outside-toplevel

    # A tokenizer or the user's layers change what is loaded: load it here.
    model = _load(args) if (args.tokenizer or args.custom_objects) else args.model
    path = export_model(model, args.model_base_path, args.model_name,
                        version=args.version, max_new_tokens=args.max_new_tokens,
                        jit_compile=args.xla, chat=args.chat, safe_mode=not args.unsafe,
                        warmup=args.warmup, litert=args.litert,
                        litert_batch_sizes=(None if args.litert_batch_sizes is None else
                                            _int_list(args.litert_batch_sizes,
                                                      "--litert-batch-sizes")),
                        litert_max_length=args.litert_max_length,
                        litert_lengths=_lengths(args.litert_lengths, args.litert_max_length))
    print(path)


def cmd_optimize(args):
    from keras_llm.optimize.pipeline import OptimizeOptions, run  # pylint: disable=import-outside-toplevel

    options = OptimizeOptions(
        prune=args.prune, structure=args.structure, prune_method=args.prune_method,
        calibration_sequences=args.calibration_sequences, recovery_steps=args.recovery_steps,
        quantize=args.quantize, distill_layers=args.distill_layers,
        distill_steps=args.distill_steps, dtype=args.dtype, eval_tokens=args.eval_tokens,
        train_tokens=args.train_tokens, speed=args.speed, logdir=args.logdir,
        batch_size=args.batch_size, sequence_length=args.sequence_length,
        strategy=args.strategy, backup_dir=args.backup_dir, backup_every=args.backup_every)
    options.validate()  # before loading anything
    if options.strategy == "multi_worker":
        from keras_llm.optimize.strategy import training_strategy  # pylint: disable=import-outside-toplevel

        training_strategy(kind="multi_worker")  # before TensorFlow runs anything (loading)
    model = _load(args) if (args.tokenizer or args.unsafe) else args.model
    run(model, args.output, args.report, options)
    print(args.output)


def bench(argv):
    """`keras-llm bench ...`: the suite in a checkout's `benchmarks/` (it is
    not part of the wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "benchmarks", "suite.py")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        from benchmarks.suite import main as suite  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        print(f"keras-llm: error: the benchmark suite lives in the repository's benchmarks/ "
              f"(run from a checkout installed with pip install -e .): {error}", file=sys.stderr)
        return 2
    return suite(argv)


COMMANDS = {"generate": cmd_generate, "tokenize": cmd_tokenize, "export": cmd_export,
            "optimize": cmd_optimize,
            "import": cmd_import, "client": cmd_client, "chat": cmd_chat}


@contextlib.contextmanager
def _quiet_native_logs(enabled):
    """Send what native libraries write to file descriptor 2 (TensorFlow's
    and LiteRT's C++ log lines) to /dev/null; Python's `sys.stderr` (errors,
    progress) keeps the real stream."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # captured (pytest, notebooks)
        python_on_fd2 = False
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    previous = sys.stderr
    if python_on_fd2:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8",
                               errors="backslashreplace")
    try:
        yield
    finally:
        if python_on_fd2:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv
    if verbose:
        argv = [a for a in argv if a != "--verbose"]
    quiet = not verbose and os.environ.get("KERAS_LLM_DEBUG") != "1"
    # serve keeps its native log lines (operators read them); bench's engines
    # log to files of their own.
    with _quiet_native_logs(quiet and argv[:1] not in (["serve"], ["bench"])):
        return _main(argv)


def _main(argv):
    if argv[:1] == ["serve"]:  # TF Serving's flag names: parsed by the server itself
        from keras_llm.serving.server import main as serve  # pylint: disable=import-outside-toplevel

        try:
            return serve(argv[1:])
        except (OSError, ValueError, RuntimeError) as error:  # bad config, port in use, ...
            if os.environ.get("KERAS_LLM_DEBUG") == "1":
                raise
            print(f"keras-llm serve: error: {error}", file=sys.stderr)
            return 2
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import keras_llm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("keras-llm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:  # pylint: disable=broad-except
        if os.environ.get("KERAS_LLM_DEBUG") == "1":
            raise
        message = str(error).strip().splitlines()
        message = message[0] if message else type(error).__name__
        if hasattr(error, "code") and hasattr(error, "details"):  # grpc.RpcError
            message = f"server answered {error.code().name}: {error.details()}"
        elif not isinstance(error, (UsageError, ValueError, OSError, TypeError)):
            message = f"{type(error).__name__}: {message}"
        print(f"keras-llm: error: {message}", file=sys.stderr)
        return 2
    return 0


def console_main():
    """The `keras-llm` command. After `generate` and `tokenize` the process
    ends without tearing the interpreter down (unmapping the model and
    freeing packed weights takes a tenth of a second, after the answer)."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv[:1] in (["generate"], ["tokenize"]):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
    return code


if __name__ == "__main__":
    sys.exit(console_main())
