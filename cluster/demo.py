"""The README's main job: start a local cluster (`tandem up`: etcd, one prefill worker, one decode
worker, the router), send a chat request through the official `openai` client, print the answer,
stop the cluster. Extra arguments go to `tandem up` (e.g. `--prefill 2`, `--model PATH`)."""

from __future__ import annotations

import sys
import time

import openai

from cluster.up_process import tandem_up

QUESTION = "What is the capital of France?"


def main(argv: list[str]) -> int:
    started = time.monotonic()
    with tandem_up(*argv, timeout_s=600) as cluster:
        assert cluster.router is not None
        for line in [w.text() for w in cluster.workers] + [cluster.router.text()]:
            print(f"  {line}", flush=True)
        print(f"cluster ready in {time.monotonic() - started:.1f} s\n")
        client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="not-needed")
        model = client.models.list().data[0].id
        sent = time.monotonic()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=48, temperature=0)
        took = time.monotonic() - sent
        print(f"user: {QUESTION}\n{model}: {reply.choices[0].message.content}")
        usage = reply.usage
        assert usage is not None
        print(f"\n({usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens in {took:.2f} s, "
              f"finish reason {reply.choices[0].finish_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
