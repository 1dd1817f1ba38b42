"""One artifact's answers and work on this machine, as one JSON line (check.sh runs it on the
x86 host with the numpy engine as the reference, and under qemu-user on emulated Arm cores).

    python probe.py ART --engine numpy                  # reference: teacher-forced top-1 ids
    python probe.py ART --engine ort --threads 1 --mark # + answer, marks for insns_marks.c

Teacher-forced top-1: the argmax after every prefix of a fixed text, in one multi-token forward
per chunk, so machines are compared position by position (greedy ids may flip at a near tie and
then differ everywhere after). With --mark, the guest calls the otherwise unused system call
0x7e57 around DECODE_TOKENS one-token forwards; the QEMU plugin writes its instruction count at
each call, and check.sh divides the difference.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys

TEXT = ("The Raspberry Pi is a series of small single-board computers. It was developed in the "
        "United Kingdom to promote the teaching of basic computer science in schools. Later it "
        "became popular for robotics, home automation and industrial uses, because it is cheap, "
        "small and runs Linux.")
QUESTION = "What is the capital of France?"
ANSWER_TOKENS = 12
DECODE_TOKENS = 8  # counted between the marks, after two warm-up steps
PREFILL_TOKENS = 64  # one prompt chunk, counted between marks 3 and 4 (after one to warm up)
MARK_SYSCALL = 0x7e57


def mark(tag: int, enabled: bool):
    if enabled:
        ctypes.CDLL(None, use_errno=True).syscall(MARK_SYSCALL, tag)  # -ENOSYS, seen by the plugin


def top1(gen) -> list[int]:
    ids = gen.tokenizer.encode(TEXT, add_special_tokens=False).ids
    step, out = gen.engine.prefill_len, []
    for start in range(0, len(ids), step):
        logits = gen.engine.forward(ids[start:start + step], start, all_logits=True)
        out += [int(i) for i in logits.reshape(-1, logits.shape[-1]).argmax(-1)]
    return out


def answer(gen, marks: bool) -> str:
    """The greedy answer (ANSWER_TOKENS at most); decode steps 2 .. 2 + DECODE_TOKENS - 1 are
    marked, and an answer that ends sooner is decoded on (its last token again) to fill them."""
    ids = gen.encode_chat([{"role": "user", "content": QUESTION}])
    logits = gen.prefill(ids)
    pos, out, ended = len(ids), [], False
    for step in range(max(ANSWER_TOKENS, 2 + DECODE_TOKENS)):
        token = int(logits.reshape(-1)[-logits.shape[-1]:].argmax())
        ended = ended or token in gen.eos_ids or step >= ANSWER_TOKENS
        if ended:
            if step >= 2 + DECODE_TOKENS:
                break
            token = out[-1] if out else token
        else:
            out.append(token)
        if step == 2:
            mark(1, marks)
        logits = gen.engine.forward([token], pos)
        pos += 1
        if step == 2 + DECODE_TOKENS - 1:
            mark(2, marks)
    return gen.tokenizer.decode(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--engine", default="ort")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mark", action="store_true", help="mark the decode steps for the plugin")
    p.add_argument("--kernel", default="auto", help="the path of 8-bit weights (edgellm --kernel)")
    args = p.parse_args()

    from edgellm.runtime.cpu import read_cpu, slow_parts
    from edgellm.runtime.generator import Generator

    result = {"artifact": args.artifact, "engine": args.engine}
    if args.engine == "ort":
        import onnxruntime as ort

        ort.set_default_logger_severity(1)  # INFO: MatMulNBits says when it falls back
        cpu = read_cpu()
        result.update(cpu=cpu.name, dotprod=cpu.dotprod, ort=ort.__version__)
    gen = Generator.load(args.artifact, engine=args.engine, threads=args.threads,
                         allow_slow_kernels=True, kernel=args.kernel)
    if args.engine == "ort":
        result["predicted_slow"] = slow_parts(gen.artifact.manifest, cpu, ort.__version__)
        result["qgemm_graphs"] = len(gen.engine.relaid)  # 8-bit graphs re-laid at load
        result["kernel"] = gen.engine.kernel.line()
    result["top1"] = top1(gen)
    result["answer"] = answer(gen, args.mark)
    chunk = gen.tokenizer.encode(TEXT, add_special_tokens=False).ids * 4
    gen.engine.forward(chunk[:PREFILL_TOKENS], 0)  # warm-up
    mark(3, args.mark)
    gen.engine.forward(chunk[:PREFILL_TOKENS], 0)
    mark(4, args.mark)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
