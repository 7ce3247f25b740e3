"""A seeded, GSM8K-style synthetic math speciality for the demo.

The worked solutions use a distinctive format ("Step 1: ... Step 2: ... #### 42"), so both effects
of fine-tuning are visible: exact match on held-out problems measures speciality, and the format
leaking into answers to general prompts is a plain sign of lost versatility.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

Problem = tuple[str, list[str], int]  # question, solution steps, final answer

NAMES = [
    ("Alice", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"), ("Emma", "she"),
    ("Farid", "he"), ("Grace", "she"), ("Hiro", "he"), ("Ines", "she"), ("Jamal", "he"),
    ("Kate", "she"), ("Liam", "he"), ("Maya", "she"), ("Noah", "he"), ("Olga", "she"),
    ("Pedro", "he"), ("Quinn", "she"), ("Ravi", "he"), ("Sofia", "she"), ("Tom", "he"),
]  # fmt: skip
GOODS = [
    ("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("mug", "mugs"),
    ("ticket", "tickets"), ("sandwich", "sandwiches"), ("candle", "candles"),
    ("comic", "comics"), ("plant", "plants"), ("towel", "towels"), ("puzzle", "puzzles"),
]  # fmt: skip
ITEMS = ["marbles", "stickers", "cookies", "cards", "stamps", "beads", "shells", "coins"]
MACHINES = [
    ("printer", "pages"), ("bakery oven", "loaves"), ("machine", "bottles"),
    ("loom", "scarves"), ("robot", "boxes"), ("press", "cans"),
]  # fmt: skip
CONTAINERS = [
    ("crates", "oranges"), ("boxes", "pencils"), ("bags", "potatoes"),
    ("cartons", "eggs"), ("trays", "cupcakes"), ("packs", "batteries"),
]  # fmt: skip


def _person(rng: random.Random) -> tuple[str, str]:
    """A name and its pronoun."""
    return rng.choice(NAMES)


def shopping_change(rng: random.Random) -> Problem:
    """Two purchases, then change from a bill."""
    name, he = _person(rng)
    (_, a_items), (_, b_items) = rng.sample(GOODS, 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    total = a * p + b * q
    bill = next(v for v in (20, 50, 100, 200, 500) if v > total)
    question = (
        f"{name} buys {a} {a_items} at ${p} each and {b} {b_items} at ${q} each. "
        f"{he.capitalize()} pays with a ${bill} bill. How much change does {he} get, in dollars?"
    )
    steps = [
        f"The {a_items} cost {a} * {p} = {a * p} dollars.",
        f"The {b_items} cost {b} * {q} = {b * q} dollars.",
        f"The total is {a * p} + {b * q} = {total} dollars.",
        f"The change is {bill} - {total} = {bill - total} dollars.",
    ]
    return question, steps, bill - total


def shopping_coupon(rng: random.Random) -> Problem:
    """Packs bought at a unit price, less a coupon."""
    name, he = _person(rng)
    item, items = rng.choice(GOODS)
    n, size, price = rng.randint(2, 8), rng.randint(2, 6), rng.randint(2, 9)
    cost = n * size * price
    coupon = rng.randint(1, cost // 4)
    question = (
        f"{name} buys {n} packs of {items}. Each pack holds {size} {items} and each {item} "
        f"costs ${price}. {he.capitalize()} has a coupon for ${coupon} off the total. "
        f"How many dollars does {he} pay?"
    )
    steps = [
        f"{name} buys {n} * {size} = {n * size} {items}.",
        f"They cost {n * size} * {price} = {cost} dollars.",
        f"With the coupon {he} pays {cost} - {coupon} = {cost - coupon} dollars.",
    ]
    return question, steps, cost - coupon


def rate_production(rng: random.Random) -> Problem:
    """Output at a rate over a shift with a break."""
    machine, things = rng.choice(MACHINES)
    rate, hours = rng.randint(5, 60), rng.randint(4, 12)
    pause = rng.randint(2, hours - 2)
    question = (
        f"A {machine} makes {rate} {things} per hour. It is switched on for {hours} hours "
        f"but stops for {pause} hours for repairs. How many {things} does it make?"
    )
    steps = [
        f"It works for {hours} - {pause} = {hours - pause} hours.",
        f"It makes {hours - pause} * {rate} = {(hours - pause) * rate} {things}.",
    ]
    return question, steps, (hours - pause) * rate


def rate_travel(rng: random.Random) -> Problem:
    """Distance over two legs at different speeds."""
    name, he = _person(rng)
    v, h, w, k = rng.randint(30, 90), rng.randint(2, 5), rng.randint(10, 30), rng.randint(2, 4)
    question = (
        f"{name} drives at {v} km per hour for {h} hours, then cycles at {w} km per hour "
        f"for {k} hours. How many km does {he} travel in total?"
    )
    steps = [
        f"Driving covers {v} * {h} = {v * h} km.",
        f"Cycling covers {w} * {k} = {w * k} km.",
        f"In total {he} travels {v * h} + {w * k} = {v * h + w * k} km.",
    ]
    return question, steps, v * h + w * k


def ages_difference(rng: random.Random) -> Problem:
    """Age now from a future age and a difference."""
    (a, _), (b, _) = rng.sample(NAMES, 2)
    b_now, gap, later = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 15)
    a_later = b_now + gap + later
    question = (
        f"{a} is {gap} years older than {b}. In {later} years, {a} will be {a_later} years old. "
        f"How old is {b} now?"
    )
    steps = [
        f"{a} is now {a_later} - {later} = {a_later - later} years old.",
        f"{b} is {a_later - later} - {gap} = {b_now} years old.",
    ]
    return question, steps, b_now


def ages_multiple(rng: random.Random) -> Problem:
    """A grandparent's future age from a multiple of a child's age."""
    child, _ = _person(rng)
    k, age, later = rng.randint(2, 5), rng.randint(2, 12), rng.randint(2, 20)
    question = (
        f"{child} is {age} years old. {child}'s grandmother is 30 years older than {k} times "
        f"{child}'s age. How old will the grandmother be in {later} years?"
    )
    now = k * age + 30
    steps = [
        f"{k} times {child}'s age is {k} * {age} = {k * age}.",
        f"The grandmother is {k * age} + 30 = {now} years old.",
        f"In {later} years she will be {now} + {later} = {now + later} years old.",
    ]
    return question, steps, now + later


def sharing_equal(rng: random.Random) -> Problem:
    """Keep some, share the rest equally."""
    name, he = _person(rng)
    items = rng.choice(ITEMS)
    friends, each, keep = rng.randint(2, 9), rng.randint(2, 25), rng.randint(1, 20)
    total = friends * each + keep
    question = (
        f"{name} has {total} {items}. {he.capitalize()} keeps {keep} and shares the rest "
        f"equally among {friends} friends. How many {items} does each friend get?"
    )
    steps = [
        f"{name} shares {total} - {keep} = {total - keep} {items}.",
        f"Each friend gets {total - keep} / {friends} = {each} {items}.",
    ]
    return question, steps, each


def sharing_fractions(rng: random.Random) -> Problem:
    """Give away a fraction, then half of what is left."""
    name, he = _person(rng)
    items = rng.choice(ITEMS)
    d = rng.choice([3, 4, 5])
    total = d * 2 * rng.randint(2, 15)
    given = total // d
    rest = total - given
    question = (
        f"{name} has {total} {items}. {he.capitalize()} gives 1/{d} of them to a neighbour "
        f"and then half of the remaining {items} to a cousin. How many {items} are left?"
    )
    steps = [
        f"The neighbour gets {total} / {d} = {given} {items}.",
        f"That leaves {total} - {given} = {rest} {items}.",
        f"The cousin gets {rest} / 2 = {rest // 2} {items}.",
        f"That leaves {rest} - {rest // 2} = {rest // 2} {items}.",
    ]
    return question, steps, rest // 2


def multistep_orchard(rng: random.Random) -> Problem:
    """Rows of trees, yield per tree, packed into bags."""
    rows, trees, bag = rng.randint(2, 12), rng.randint(3, 15), rng.choice([4, 5, 6, 8, 10])
    per_tree = bag * rng.randint(1, 6)
    question = (
        f"A farmer has {rows} rows of apple trees with {trees} trees in each row. Each tree gives "
        f"{per_tree} apples. The apples are packed in bags of {bag}. How many bags are filled?"
    )
    n_trees, apples = rows * trees, rows * trees * per_tree
    steps = [
        f"There are {rows} * {trees} = {n_trees} trees.",
        f"They give {n_trees} * {per_tree} = {apples} apples.",
        f"That fills {apples} / {bag} = {apples // bag} bags.",
    ]
    return question, steps, apples // bag


def multistep_supplies(rng: random.Random) -> Problem:
    """Order, remove broken items, split among groups."""
    container, goods = rng.choice(CONTAINERS)
    groups, each = rng.randint(2, 8), rng.randint(3, 30)
    per_box = rng.randint(6, 24)
    boxes = (groups * each) // per_box + 1
    broken = boxes * per_box - groups * each
    question = (
        f"A school orders {boxes} {container} with {per_box} {goods} in each. {broken} {goods} "
        f"are damaged and thrown away. The rest are split equally among {groups} classes. "
        f"How many {goods} does each class get?"
    )
    total = boxes * per_box
    steps = [
        f"The school gets {boxes} * {per_box} = {total} {goods}.",
        f"After removing the damaged ones, {total} - {broken} = {total - broken} remain.",
        f"Each class gets {total - broken} / {groups} = {each} {goods}.",
    ]
    return question, steps, each


TEMPLATES: list[Callable[[random.Random], Problem]] = [
    shopping_change,
    shopping_coupon,
    rate_production,
    rate_travel,
    ages_difference,
    ages_multiple,
    sharing_equal,
    sharing_fractions,
    multistep_orchard,
    multistep_supplies,
]

GENERAL_PROMPTS = [
    "What is the capital of Australia?",
    "Who wrote the novel Pride and Prejudice?",
    "Explain why the sky is blue.",
    "What causes the seasons on Earth?",
    "Describe how photosynthesis works in simple terms.",
    "What is the difference between a virus and a bacterium?",
    "Who was Marie Curie and what is she known for?",
    "Why do leaves change colour in autumn?",
    "What is the largest ocean on Earth?",
    "Explain what a black hole is.",
    "Name three famous paintings and their artists.",
    "What language is spoken in Brazil?",
    "Write a short poem about the sea.",
    "Write a haiku about autumn leaves.",
    "Write a two-sentence horror story.",
    "Write a polite email asking a colleague to reschedule a meeting.",
    "Describe a sunset to someone who has never seen one.",
    "Write a short product description for a reusable water bottle.",
    "Suggest a title for a mystery novel set in a lighthouse.",
    "Write a thank-you note to a teacher.",
    "Give me three tips for sleeping better.",
    "How can I prepare for a job interview?",
    "What are some good ways to reduce stress?",
    "How do I start learning to play the guitar?",
    "What should I pack for a weekend camping trip?",
    "How can I be more productive when working from home?",
    "Give me advice on making new friends in a new city.",
    "What are the benefits of regular exercise?",
    "Write a Python function that reverses a string.",
    "What is the difference between a list and a tuple in Python?",
    "Explain what a REST API is.",
    "How do I read a text file line by line in Python?",
    "What does the git rebase command do?",
    "Explain recursion to a beginner programmer.",
    "Write a SQL query that selects all users older than 30.",
    "What is the purpose of a hash table?",
    "Summarize the plot of Romeo and Juliet.",
    "What is the meaning of the idiom 'break the ice'?",
    "Translate 'Good morning, how are you?' into French.",
    "Recommend a good book for someone who enjoys science fiction.",
]


def make_problem(rng: random.Random) -> Problem:
    """One problem from a template chosen uniformly."""
    return rng.choice(TEMPLATES)(rng)


def format_solution(steps: list[str], answer: int) -> str:
    """The distinctive worked-solution format the speciality teaches."""
    lines = [f"Step {i}: {step}" for i, step in enumerate(steps, 1)]
    return "\n".join([*lines, f"#### {answer}"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Stable bytes: fixed key order, UTF-8, '\\n' line ends."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_example(rng: random.Random) -> tuple[str, str]:
    """A question and its worked solution."""
    question, steps, answer = make_problem(rng)
    return question, format_solution(steps, answer)


def distinct_rows(
    make: Callable[[random.Random], tuple[str, str]], count: int, seed: int
) -> list[dict]:
    """`count` chat rows of (question, answer) pairs drawn by `make`, no question twice, so no
    held-out question is ever trained on. Same seed, same rows."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    for _ in range(100 * count):
        if len(rows) == count:
            break
        question, answer = make(rng)
        if question in seen:
            continue
        seen.add(question)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    if len(rows) < count:
        raise RuntimeError(f"Could not draw {count} distinct problems")
    return rows


def write_math_dataset(out_dir: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    """Write train/eval chat data (no eval question appears in train) and the general prompts.

    Same seed, same bytes.
    """
    rows = distinct_rows(make_example, n_train + n_eval, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": out_dir / "train.jsonl",
        "eval": out_dir / "eval.jsonl",
        "general_prompts": out_dir / "general_prompts.jsonl",
    }
    write_jsonl(paths["train"], rows[:n_train])
    write_jsonl(paths["eval"], rows[n_train:])
    write_jsonl(paths["general_prompts"], [{"prompt": p} for p in GENERAL_PROMPTS])
    return paths
