"""Writes the small code-generation dataset demo4 fine-tunes on (written for this project):

    python demos/datasets/make_code_dataset.py

code_instructions.jsonl: short Python tasks (alpaca rows: instruction -> a complete function).
code_eval.jsonl: held-out tasks; none of their instructions appears in the training file.
Every function is checked by running it on an example before it is written.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (function name, arguments, what it does, body, an example call and its result)
TASKS = [
    ("add", "a, b", "returns the sum of two numbers", "return a + b", "add(2, 3)", 5),
    ("subtract", "a, b", "returns a minus b", "return a - b", "subtract(7, 2)", 5),
    ("multiply", "a, b", "returns the product of two numbers", "return a * b", "multiply(4, 5)", 20),
    ("divide", "a, b", "returns a divided by b, or None when b is zero",
     "if b == 0:\n        return None\n    return a / b", "divide(9, 3)", 3.0),
    ("power", "base, exponent", "raises base to the power exponent", "return base ** exponent", "power(2, 10)", 1024),
    ("average", "a, b", "returns the average of two numbers", "return (a + b) / 2", "average(4, 8)", 6.0),
    ("max_of_two", "a, b", "returns the larger of two numbers", "return a if a > b else b", "max_of_two(3, 9)", 9),
    ("min_of_two", "a, b", "returns the smaller of two numbers", "return a if a < b else b", "min_of_two(3, 9)", 3),
    ("absolute", "x", "returns the absolute value of a number without using abs",
     "return -x if x < 0 else x", "absolute(-4)", 4),
    ("is_even", "n", "returns True when n is even", "return n % 2 == 0", "is_even(10)", True),
    ("is_positive", "x", "returns True when x is greater than zero", "return x > 0", "is_positive(-1)", False),
    ("square", "x", "returns the square of a number", "return x * x", "square(7)", 49),
    ("celsius_to_fahrenheit", "c", "converts a temperature from Celsius to Fahrenheit",
     "return c * 9 / 5 + 32", "celsius_to_fahrenheit(100)", 212.0),
    ("sum_list", "numbers", "returns the sum of a list of numbers",
     "total = 0\n    for n in numbers:\n        total += n\n    return total", "sum_list([1, 2, 3])", 6),
    ("product_list", "numbers", "returns the product of a list of numbers",
     "result = 1\n    for n in numbers:\n        result *= n\n    return result", "product_list([2, 3, 4])", 24),
    ("mean", "numbers", "returns the mean of a non-empty list of numbers",
     "return sum(numbers) / len(numbers)", "mean([2, 4, 6])", 4.0),
    ("largest", "numbers", "returns the largest number in a non-empty list without using max",
     "best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n            best = n\n    return best",
     "largest([3, 8, 1])", 8),
    ("count_even", "numbers", "counts the even numbers in a list",
     "return sum(1 for n in numbers if n % 2 == 0)", "count_even([1, 2, 4, 5])", 2),
    ("evens", "numbers", "returns the even numbers of a list, in order",
     "return [n for n in numbers if n % 2 == 0]", "evens([1, 2, 3, 4])", [2, 4]),
    ("squares", "numbers", "returns a list of the squares of the numbers",
     "return [n * n for n in numbers]", "squares([1, 2, 3])", [1, 4, 9]),
    ("positives", "numbers", "returns only the positive numbers of a list",
     "return [n for n in numbers if n > 0]", "positives([-1, 2, 0, 5])", [2, 5]),
    ("unique", "items", "returns the items without duplicates, keeping their first order",
     "seen = set()\n    out = []\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n"
     "            out.append(item)\n    return out", "unique([1, 2, 1, 3])", [1, 2, 3]),
    ("reverse_list", "items", "returns a new list with the items in reverse order",
     "return items[::-1]", "reverse_list([1, 2, 3])", [3, 2, 1]),
    ("reverse_string", "text", "returns the string reversed", "return text[::-1]", "reverse_string('abc')", "cba"),
    ("count_vowels", "text", "counts the vowels in a string",
     "return sum(1 for ch in text.lower() if ch in 'aeiou')", "count_vowels('Hello')", 2),
    ("is_palindrome", "text", "returns True when a string reads the same backwards",
     "return text == text[::-1]", "is_palindrome('level')", True),
    ("count_words", "text", "counts the words in a sentence", "return len(text.split())",
     "count_words('one two three')", 3),
    ("capitalize_words", "text", "capitalizes the first letter of every word",
     "return ' '.join(word.capitalize() for word in text.split())", "capitalize_words('hello world')", "Hello World"),
    ("remove_spaces", "text", "removes every space from a string", "return text.replace(' ', '')",
     "remove_spaces('a b c')", "abc"),
    ("first_word", "text", "returns the first word of a sentence", "return text.split()[0]",
     "first_word('good morning')", "good"),
    ("repeat", "text, times", "repeats a string a given number of times", "return text * times",
     "repeat('ab', 3)", "ababab"),
    ("word_lengths", "text", "returns the length of each word in a sentence",
     "return [len(word) for word in text.split()]", "word_lengths('hi there')", [2, 5]),
    ("word_count", "text", "returns a dictionary counting how often each word appears",
     "counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts",
     "word_count('a b a')", {"a": 2, "b": 1}),
    ("invert_dict", "mapping", "swaps the keys and values of a dictionary",
     "return {value: key for key, value in mapping.items()}", "invert_dict({'a': 1})", {1: "a"}),
    ("merge_dicts", "first, second", "merges two dictionaries; the second wins on shared keys",
     "merged = dict(first)\n    merged.update(second)\n    return merged", "merge_dicts({'a': 1}, {'a': 2})", {"a": 2}),
    ("sorted_keys", "mapping", "returns the keys of a dictionary in sorted order",
     "return sorted(mapping)", "sorted_keys({'b': 1, 'a': 2})", ["a", "b"]),
    ("factorial", "n", "returns n factorial",
     "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result", "factorial(5)", 120),
    ("fibonacci", "n", "returns the n-th Fibonacci number, starting from fibonacci(0) == 0",
     "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a", "fibonacci(10)", 55),
    ("is_prime", "n", "returns True when n is a prime number",
     "if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n"
     "            return False\n    return True", "is_prime(13)", True),
    ("gcd", "a, b", "returns the greatest common divisor of two integers",
     "while b:\n        a, b = b, a % b\n    return a", "gcd(12, 18)", 6),
    ("sum_to_n", "n", "returns the sum of the integers from 1 to n", "return n * (n + 1) // 2", "sum_to_n(10)", 55),
    ("countdown", "n", "returns a list counting down from n to 1", "return list(range(n, 0, -1))",
     "countdown(3)", [3, 2, 1]),
    ("digits_sum", "n", "returns the sum of the digits of a non-negative integer",
     "return sum(int(d) for d in str(n))", "digits_sum(123)", 6),
    ("clamp", "x, low, high", "limits x to the range from low to high",
     "return max(low, min(x, high))", "clamp(15, 0, 10)", 10),
    ("flatten", "lists", "flattens a list of lists into one list",
     "return [item for inner in lists for item in inner]", "flatten([[1, 2], [3]])", [1, 2, 3]),
    ("chunk", "items, size", "splits a list into chunks of the given size",
     "return [items[i:i + size] for i in range(0, len(items), size)]", "chunk([1, 2, 3], 2)", [[1, 2], [3]]),
    # Held out: these go to code_eval.jsonl only.
    ("cube", "x", "returns the cube of a number", "return x * x * x", "cube(3)", 27),
    ("is_odd", "n", "returns True when n is odd", "return n % 2 == 1", "is_odd(7)", True),
    ("smallest", "numbers", "returns the smallest number in a non-empty list without using min",
     "best = numbers[0]\n    for n in numbers[1:]:\n        if n < best:\n            best = n\n    return best",
     "smallest([3, 8, 1])", 1),
    ("count_consonants", "text", "counts the consonants in a string",
     "return sum(1 for ch in text.lower() if ch.isalpha() and ch not in 'aeiou')", "count_consonants('Hello')", 3),
    ("negatives", "numbers", "returns only the negative numbers of a list",
     "return [n for n in numbers if n < 0]", "negatives([-1, 2, -5])", [-1, -5]),
    ("last_word", "text", "returns the last word of a sentence", "return text.split()[-1]",
     "last_word('good morning')", "morning"),
    ("fahrenheit_to_celsius", "f", "converts a temperature from Fahrenheit to Celsius",
     "return (f - 32) * 5 / 9", "fahrenheit_to_celsius(212)", 100.0),
    ("lcm", "a, b", "returns the least common multiple of two positive integers",
     "x, y = a, b\n    while y:\n        x, y = y, x % y\n    return a * b // x", "lcm(4, 6)", 12),
]
HELD_OUT = {"cube", "is_odd", "smallest", "count_consonants", "negatives", "last_word", "fahrenheit_to_celsius", "lcm"}

# Several ways of asking, so the model learns the task rather than one sentence.
ASKS = [
    "Write a Python function `{name}({args})` that {what}.",
    "In Python, implement `{name}({args})`: it {what}.",
]


def _code(name: str, args: str, body: str) -> str:
    return f"def {name}({args}):\n    {body}\n"


def _checked(name, args, what, body, call, expected) -> str:
    code = _code(name, args, body)
    scope: dict = {}
    exec(code, scope)  # our own fixed text above, run to prove every answer is correct
    got = eval(call, scope)
    if got != expected:
        raise SystemExit(f"{name}: {call} gave {got!r}, expected {expected!r}")
    return code


def main() -> None:
    train, held = [], []
    for name, args, what, body, call, expected in TASKS:
        code = _checked(name, args, what, body, call, expected)
        if name in HELD_OUT:
            held.append({"instruction": ASKS[0].format(name=name, args=args, what=what), "input": "", "output": code})
        else:
            for ask in ASKS:
                train.append({"instruction": ask.format(name=name, args=args, what=what), "input": "", "output": code})
    for file, rows in (("code_instructions.jsonl", train), ("code_eval.jsonl", held)):
        (HERE / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{file}: {len(rows)} rows")


if __name__ == "__main__":
    main()
