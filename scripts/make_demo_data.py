#!/usr/bin/env python
"""Write the demo's dataset: dates in many everyday formats -> ISO 8601 (YYYY-MM-DD).

    python scripts/make_demo_data.py            # rewrites fasttune/demo_data/{train,test}.jsonl
    python scripts/make_demo_data.py --out-dir /tmp/x

The output depends only on the seed, so the committed files can be checked against a fresh run.
Each line is {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}.
Test dates never occur in the training set, in any format, so the held-out score measures the
transform rather than recall of seen dates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

SEED = 20210305
N_TRAIN = 2000
N_TEST = 200
FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2049, 12, 31)
PROMPT = "Convert to ISO 8601 (YYYY-MM-DD): {}"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fasttune" / "demo_data"

# Month and weekday names are spelled out here rather than taken from strftime, whose output
# follows the process locale and would make the files differ from one machine to the next.
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def ordinal(n: int) -> str:
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    return str(n) + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _abbrev(month: int) -> str:
    return MONTHS[month - 1][:3]


# Numeric day-first and month-first layouts are both common; the (US)/(EU) tag keeps every prompt
# unambiguous, which is what makes exact match a fair score.
FORMATS = {
    "month_d_y": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "d_month_y": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "mon_d_y": lambda d: f"{_abbrev(d.month)} {d.day}, {d.year}",
    "d_mon_y": lambda d: f"{d.day} {_abbrev(d.month)} {d.year}",
    "ordinal_of_month": lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "weekday_month_d_y": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "us_slash": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (US)",
    "eu_slash": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (EU)",
    "eu_dots": lambda d: f"{d.day}.{d.month}.{d.year}",
    "y_m_d_slash": lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
}


def example(date: dt.date, fmt: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": PROMPT.format(FORMATS[fmt](date))},
            {"role": "assistant", "content": date.isoformat()},
        ]
    }


def make_splits(seed: int = SEED, n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list, list]:
    rng = random.Random(seed)
    span = (LAST_DAY - FIRST_DAY).days + 1
    dates = [FIRST_DAY + dt.timedelta(days=i) for i in rng.sample(range(span), n_train + n_test)]
    names = sorted(FORMATS)
    # Cycling through a shuffled format list keeps every format equally represented in both splits,
    # so the held-out score is not dominated by whichever format the dice favoured.
    def build(chunk):
        out = []
        for i, date in enumerate(chunk):
            if i % len(names) == 0:
                rng.shuffle(names)
            out.append(example(date, names[i % len(names)]))
        return out

    return build(dates[:n_train]), build(dates[n_train:])


def write_jsonl(path: Path, rows: list) -> None:
    # newline="\n" so the bytes are the same on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    train, test = make_splits()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "test.jsonl", test)
    print(f"wrote {len(train)} training and {len(test)} test examples to {args.out_dir}")


if __name__ == "__main__":
    main()
