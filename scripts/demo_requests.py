"""Send one question to the base and every servable adapter concurrently, with the openai client.

Usage: python scripts/demo_requests.py --url http://127.0.0.1:8000/v1
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--question", default="What should I pack for a weekend hike?")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key=os.environ.get("LORADEX_API_KEY", "not-needed"))
    # /v1/models lists each adapter as NAME, NAME@V and NAME@ALIAS: ask the base and each NAME once
    models = [m.id for m in client.models.list().data if "@" not in m.id]

    def ask(model: str) -> tuple[str, str]:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.question}],
            max_tokens=args.max_tokens, temperature=0,
        )
        return model, resp.choices[0].message.content

    with cf.ThreadPoolExecutor(len(models)) as pool:
        for model, text in pool.map(ask, models):
            print(f"[{model}] {text!r}")


if __name__ == "__main__":
    main()
