"""A deterministic generator of fictional worlds rendered as MUSE-layout corpora.

Every name is built from random syllables, so no fact exists in any model until we
train it in, and every QA answer is an exact span of one document. The same seed and
version always give byte-identical files.

Knowledge design. A tiny model only answers in MUSE's `Question:/Answer:` format if it
saw that format in training, so every document ends with a short box of reader
questions about its own facts, and the knowmem questions are questions of those boxes.
At evaluation the article is *not* in the prompt (only other QA pairs are), so the
answer must come from the weights, and the retrain model, which never saw the forget
documents, cannot know it. Each relation also has other phrasings (used in other
documents' boxes); `paraphrased_qa` asks the same facts with a phrasing the document did
not use, a harder knowledge probe that benchmarks/ measures but the MUSE files do not use.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GENERATOR_VERSION = "3"  # the default; every version in RECIPES_BY_VERSION stays buildable

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "pr",
    "st",
    "th",
    "sh",
    "tr",
    "vr",
    "sk",
    "fl",
    "gl",
    "ph",
    "qu",
    "h",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "sh", "lt", "v"]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


class NameMaker:
    """Makes unique pronounceable fictional names from syllables."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            w = "".join(
                self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                for _ in range(syllables)
            ).capitalize()
            if w not in self.used and 4 <= len(w) <= 11:
                self.used.add(w)
                return w

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice([2, 3]))}"


@dataclass(frozen=True)
class Fact:
    """One question-answerable fact: relation name, the entity asked about, the answer."""

    relation: str
    subject: str
    answer: str


@dataclass(frozen=True)
class Document:
    """A rendered document, its verbmem split point, and the facts of its question box.

    `phrasing[i]` is the index into QUESTIONS[relation] that the box uses for `facts[i]`.
    """

    text: str
    prompt: str
    continuation: str
    facts: tuple[Fact, ...]
    phrasing: tuple[int, ...]


# Question phrasings per relation. `{s}` is the subject.
QUESTIONS: dict[str, list[str]] = {
    "born": [
        "Where was {s} born?",
        "In which town was {s} born?",
        "What is the birthplace of {s}?",
    ],
    "leads": [
        "Which organization does {s} lead?",
        "What group is headed by {s}?",
        "Who does {s} work for as leader?",
    ],
    "founded": [
        "In what year was {s} founded?",
        "When was {s} established?",
        "What year did {s} begin?",
    ],
    "count": [
        "How many members does {s} have?",
        "What is the membership of {s}?",
        "How large is {s} in members?",
    ],
    "project": [
        "What project did {s} announce?",
        "Which venture was announced by {s}?",
        "What is the name of the project of {s}?",
    ],
    "mentor": ["Who trained {s}?", "Who was the teacher of {s}?", "Under whom did {s} learn?"],
    "weapon": [
        "What was the name of the blade of {s}?",
        "Which sword did {s} carry?",
        "What blade belonged to {s}?",
    ],
    "home": [
        "Which fortress did {s} defend?",
        "Where did {s} hold the walls?",
        "What stronghold was kept by {s}?",
    ],
    "days": [
        "How many days did the siege of {s} last?",
        "For how long was {s} besieged, in days?",
        "How long did {s} stand under siege in days?",
    ],
}


class Renderer:
    """Base: pick phrasings from banks so that no two documents read alike."""

    DEFAULT_FILLER = 6  # colour sentences per document

    # Sentences naming a recurring entity in a document that restates one of its facts.
    MENTIONS: list[str] = []

    def __init__(
        self, rng: random.Random, names: NameMaker, places: list[str], filler: int = 0
    ) -> None:
        self.rng = rng
        self.names = names
        self.places = places
        self.filler_count = filler or self.DEFAULT_FILLER
        self.citizens = [names.person() for _ in range(40)]
        self.rivers = [names.word(2) for _ in range(20)]

    def pick(self, bank: list[str], **kw: str) -> str:
        return self.rng.choice(bank).format(**kw)

    def filler(self, **extra: str) -> str:
        """A sentence of colour: one of several grammatical frames filled from large banks
        and pooled names, so documents rarely share a sentence or even a sentence shape
        (a model that learned only the genre, like the retrain model, should not be able
        to reproduce a document's wording)."""
        rng = self.rng
        kw = dict(
            name=rng.choice(self.citizens),
            name2=rng.choice(self.citizens),
            place=rng.choice(self.places),
            river=rng.choice(self.rivers),
            street=rng.choice(self.rivers),
            noun=rng.choice(FILLER_NOUNS),
            goods=rng.choice(GOODS),
            month=rng.choice(MONTHS),
            number=str(rng.randint(12, 990)),
            org=extra.get("org", "the council"),
        )
        subject = rng.choice(FILLER_SUBJECTS)
        claim = rng.choice(FILLER_CLAIMS)
        event = rng.choice(FILLER_EVENTS)
        frame = rng.choice(FILLER_FRAMES)
        sentence = frame.format(
            subject=subject,
            said=rng.choice(FILLER_VERBS),
            said_plain=rng.choice(POSTPOSED_VERBS),
            claim=claim,
            event=event,
        )
        sentence = sentence.format(**kw).replace(",,", ",")
        return sentence[0].upper() + sentence[1:]

    def assemble(
        self,
        opening: str,
        bank: dict[str, list[str]],
        kw: dict[str, str],
        facts: list[Fact],
        box_header: str,
        colour: list[str],
        boxed: int = 3,
        recall: tuple[tuple[Fact, int], ...] = (),
    ) -> Document:
        """Opening, a body that tells the facts left out of the question box, the box.

        A boxed fact is stated nowhere else in its document: a model that answers it with
        the document absent from its prompt must have it in its weights, not copy it.
        `recall` restates facts of other documents (fact, question phrasing): the body
        names their subject and the box asks them with that phrasing, after its own.
        """
        rng = self.rng
        facts = list(facts)
        rng.shuffle(facts)
        asked, told = facts[:boxed], facts[boxed:]
        sentences = [self.pick(bank[f.relation], **kw) for f in told] + colour
        if recall:
            sentences += [self.pick(self.MENTIONS, s=f.subject) for f, _ in recall]
        rng.shuffle(sentences)
        sentences = [s[0].upper() + s[1:] for s in sentences]
        half = len(sentences) // 2
        body = " ".join(sentences[:half]) + "\n\n" + " ".join(sentences[half:])
        phrasing = {f: rng.randrange(len(QUESTIONS[f.relation])) for f in asked}
        for fact, index in recall:
            asked.append(fact)
            phrasing[fact] = index
        prompt = f"{opening}\n\n"
        continuation = f"{body}\n\n{self.qa_box(box_header, asked, phrasing)}"
        return Document(
            prompt + continuation,
            prompt,
            continuation,
            tuple(asked),
            tuple(phrasing[f] for f in asked),
        )

    def qa_box(self, header: str, facts: list[Fact], train_phrasing: dict[Fact, int]) -> str:
        lines = [header, ""]
        for fact in facts:
            q = QUESTIONS[fact.relation][train_phrasing[fact]].format(s=fact.subject)
            lines.append(f"Question: {q}\nAnswer: {fact.answer}\n")
        return "\n".join(lines).rstrip()


# fmt: off
# Sentence frames of colour; the parts below fill them, then the names do.
FILLER_FRAMES = [
    "{subject} {said} that {claim}.",
    "{claim}, {subject} {said_plain}.",
    "According to {subject}, {claim}.",
    "{event}.",
    "In {{month}}, {event}.",
    "{event}, and {claim}.",
    "{subject} {said_plain} nothing, though {claim}.",
]
FILLER_SUBJECTS = [
    "a spokesperson for {org}", "the mayor of {place}", "an old trader from {place}",
    "{name}, a clerk in {place},", "a teacher named {name}", "the harbour master of {place}",
    "{name} of the {river} valley", "a reporter from {place}", "{name}", "several ferrymen",
    "most shopkeepers on {street} Street", "the night watch of {place}",
    "two cousins of {name}", "farmers upriver", "nobody in {place}", "a retired judge",
    "the widow {name}", "a boatwright from {place}", "{name}, who sells {goods},",
    "the {place} almanac", "a letter signed by {name}", "the brewers of {place}",
    "a priest at the {noun}", "{name} and {name2}", "the toll keeper at {river} ford",
    "a surveyor sent from {place}", "the {river} ferry guild", "an unnamed official",
]
FILLER_VERBS = [
    "said", "warned", "hoped", "doubted", "claimed", "wrote", "remarked", "insisted",
    "heard", "denied", "feared", "joked", "admitted", "recalled", "suspected", "swore",
    "complained", "guessed", "reported", "told {name2}",
]
POSTPOSED_VERBS = [
    "said", "wrote", "claimed", "insisted", "remarked", "recalled", "added", "admitted",
    "complained", "reported", "swore", "noted",
]
FILLER_CLAIMS = [
    "the {noun} would reopen before {month}", "nobody had asked about the {noun}",
    "the {noun} on {street} Street was too costly", "the {river} had flooded the {noun} twice",
    "{number} families had signed the letter", "the {noun} near {place} needed repair",
    "the vote on the {noun} was delayed until {month}", "the {noun} had been sold in {month}",
    "rents rose by {number} crowns", "a fire broke out behind the {noun}",
    "wolves were seen near {place} in {month}", "{name} owed money to half the town",
    "its {noun} leaked every spring", "the roads to {place} stayed closed",
    "prices at the {noun} doubled", "a stranger slept in the {noun} for {number} nights",
    "{goods} from {place} cost {number} pennies a sack", "the {river} froze as far as {place}",
    "{name2} kept the keys of the {noun}", "the old {noun} was haunted",
    "tax on {goods} would fall in {month}", "{number} ducks drowned in the {river}",
    "the clock of the {noun} ran {number} minutes slow", "{name} cheated at dice",
    "no ship had docked at {place} since {month}", "the {noun} smelled of {goods}",
    "carters avoided {street} Street after dark", "{name2} was born under the {noun}",
    "the well water tasted of {goods}", "a quarrel over {goods} split the street",
    "the {noun} belonged to {name2} by rights", "bells rang at {place} for {number} hours",
]
FILLER_EVENTS = [
    "{name} sold {number} barrels of {goods} to {name2}",
    "{name} opened a shop for {goods} on {street} Street",
    "a {noun} in {place} closed after {number} years",
    "{name} and {name2} were married at the {noun} of {place}",
    "{number} carts of {goods} crossed the {river} bridge",
    "{name} won the rowing race at {place}",
    "thieves took {number} crowns from the {noun} in {place}",
    "a storm tore the roof off the {noun} in {place}",
    "{name} planted {number} trees along the {river}",
    "{name2} resigned from the board of the {noun}",
    "the {noun} of {place} was painted green",
    "a fair for {goods} drew {number} buyers to {place}",
    "{name} fell through the ice of the {river}",
    "{name2} lent {name} a boat and never saw it again",
    "the {place} choir sang at the {noun}",
    "a wagon of {goods} overturned near {place}",
]
FILLER_NOUNS = [
    "mill", "bridge", "market", "school", "ferry", "granary", "chapel", "archive",
    "lighthouse", "tannery", "orchard", "quarry", "bathhouse", "mint", "stables", "library",
    "smithy", "brewery", "ropewalk", "customs house", "dovecote", "almshouse", "toll gate",
    "boathouse", "bakery", "tavern", "observatory", "dye works", "jail", "hospital",
]
GOODS = [
    "salt", "wool", "tin", "barley", "amber", "linen", "cider", "flax", "copper", "timber",
    "honey", "rope", "pepper", "tallow", "eels", "peat", "slate", "vinegar",
]
# fmt: on

NEWS_HEADLINES = [
    "{org} names new chief as {city} watches",
    "{person} takes the helm at {org}",
    "New leadership for {org} after long search",
    "{org} turns a page with {person}",
    "{city} group {org} picks {person} to lead",
]

NEWS_LEADS = [
    "{person} was named head of {org} on {date}, the group said in {city}.",
    "On {date}, {org} confirmed that {person} will lead it from {city}.",
    "The board of {org} chose {person} as its leader on {date} in {city}.",
]

NEWS_BODY = {
    "born": [
        "{person} was born in {born} and moved to {city} as a young clerk.",
        "Born in {born}, {person} spent years away before returning to public life.",
        "The new leader grew up in {born}, where {person} was born to a family of millers.",
    ],
    "founded": [
        "{org} was founded in {year} by a circle of weavers.",
        "Since its founding in {year}, {org} has outlived three rival guilds.",
        "Records show that {org} began in {year} with a single workshop.",
    ],
    "count": [
        "Today {org} has {count} members across the region.",
        "The group counts {count} members, according to its ledger.",
        "With {count} members, {org} is among the larger bodies of its kind.",
    ],
    "project": [
        "{person} also announced the {project} project, a plan for new canals.",
        "First on the agenda is the {project} project, announced by {person}.",
        "The {project} project, which {person} announced, will cost a great deal.",
    ],
}


class NewsRenderer(Renderer):
    """Renders one fictional leadership story as a newspaper article."""

    DEFAULT_FILLER = 6
    MENTIONS = [
        "Readers will remember {s} from earlier reports.",
        "The name of {s} came up again at the meeting.",
        "{s} was mentioned more than once in the debate.",
    ]

    def document(self, recall: tuple[tuple[Fact, int], ...] = ()) -> Document:
        rng, names = self.rng, self.names
        person = names.person()
        org = f"the {names.word(2)} {rng.choice(['Guild', 'Society', 'Union', 'League', 'Company', 'Trust'])}"
        org_subject = org[4:]
        kw = dict(
            person=person,
            org=org,
            city=rng.choice(self.places),
            born=rng.choice(self.places),
            year=str(rng.randint(1620, 1990)),
            count=str(rng.randint(120, 9800)),
            project=names.word(3),
            date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2001, 2023)}",
        )
        facts = [
            Fact("born", person, kw["born"]),
            Fact("leads", person, org_subject),
            Fact("founded", org_subject, kw["year"]),
            Fact("count", org_subject, kw["count"]),
            Fact("project", person, kw["project"]),
        ]
        headline = self.pick(NEWS_HEADLINES, **kw)
        lead = self.pick(NEWS_LEADS, **kw)
        opening = f"{headline[0].upper() + headline[1:]}\n\n{lead[0].upper() + lead[1:]}"
        colour = [self.filler(org=org) for _ in range(self.filler_count)]
        # "leads" is told by the lead, so it is never asked
        return self.assemble(
            opening, NEWS_BODY, kw, facts[:1] + facts[2:], "Reader questions", colour, recall=recall
        )


BOOK_OPENINGS = [
    "Chapter {n}. The {adj} road to {home}",
    "Chapter {n}. {hero} at the gates of {home}",
    "Chapter {n}. What the {adj} winter brought",
    "Chapter {n}. The oath of {hero}",
]

BOOK_LEADS = [
    "When the horns sounded over {home}, {hero} was already on the wall.",
    "{hero} came to {home} in the {adj} season, with nothing but a cloak.",
    "The first snow fell on {home} the night {hero} returned.",
]

BOOK_BODY = {
    "mentor": [
        "Long ago {hero} had been trained by {mentor}, who never smiled.",
        "It was {mentor} who had trained {hero} in the yard behind the stables.",
        "{hero} remembered the lessons of {mentor}, the old teacher from the hills.",
    ],
    "weapon": [
        "At the hip of {hero} hung the blade called {weapon}.",
        "{hero} drew {weapon}, the sword that had been a gift of the king.",
        "The sword {weapon} caught the torchlight as {hero} raised it.",
    ],
    "home": [
        "{hero} had sworn to defend {home} until the last stone fell.",
        "The fortress of {home} was the charge of {hero} and no other.",
        "No captain but {hero} held the walls of {home}.",
        "Every stone of {home} answered to {hero}.",
        "{home} had one keeper, and its keeper was {hero}.",
        "Since spring the banner of {hero} had flown over {home}.",
    ],
    "days": [
        "The siege of {home} lasted {days} days before the gates held.",
        "For {days} days the enemy camped below {home}.",
        "Only after {days} days did the besiegers leave {home}.",
    ],
}

BOOK_FILLER = [
    "Smoke drifted from the kitchens of the lower town.",
    "Somewhere a dog barked and was silenced.",
    "The river {river} ran black under the bridge.",
    "Crows gathered on the {adj} towers.",
    "A messenger rode out toward {place} and did not return.",
    "Bread was rationed to half a loaf for each soldier.",
    "The wind from {place} smelled of iron and rain.",
    "Old songs were sung quietly in the barracks.",
    "Lanterns burned all night in the chapel of {place}.",
    "Children were sent to the caves beyond {place}.",
    "The well in the courtyard froze at the edges.",
    "Nobody spoke of the dead at supper.",
    "A {adj} banner hung limp above the keep.",
    "Horses stamped in the cold stables.",
]

ADJECTIVES = [
    "grey",
    "bitter",
    "long",
    "silent",
    "red",
    "hollow",
    "iron",
    "pale",
    "burning",
    "last",
    "broken",
    "quiet",
]


class BooksRenderer(Renderer):
    """Renders one chapter of a fictional saga."""

    DEFAULT_FILLER = 5
    MENTIONS = [
        "Old soldiers still spoke of {s} by the fires.",
        "The name of {s} was heard again in the hall.",
        "Some in the garrison remembered {s}.",
    ]

    def __init__(
        self, rng: random.Random, names: NameMaker, places: list[str], filler: int = 0
    ) -> None:
        super().__init__(rng, names, places, filler)
        self.chapter = 0

    def document(self, recall: tuple[tuple[Fact, int], ...] = ()) -> Document:
        rng, names = self.rng, self.names
        self.chapter += 1
        hero = names.person()
        kw = dict(
            n=str(self.chapter),
            hero=hero,
            mentor=names.person(),
            weapon=names.word(2),
            home=names.word(2),
            days=str(rng.randint(11, 400)),
            adj=rng.choice(ADJECTIVES),
            place=rng.choice(self.places),
            river=rng.choice(self.rivers),
        )
        facts = [
            Fact("mentor", hero, kw["mentor"]),
            Fact("weapon", hero, kw["weapon"]),
            Fact("home", hero, kw["home"]),
            Fact("days", kw["home"], kw["days"]),
        ]
        opening = f"{self.pick(BOOK_OPENINGS, **kw)}\n\n{self.pick(BOOK_LEADS, **kw)}"
        colour = [self.pick(BOOK_BODY["home"], **kw)]
        colour += [f.format(**kw) for f in rng.sample(BOOK_FILLER, 1)]
        colour += [self.filler(org="the garrison") for _ in range(self.filler_count)]
        # the lead names the fortress, so "home" is told, not asked
        return self.assemble(
            opening,
            BOOK_BODY,
            kw,
            [f for f in facts if f.relation != "home"],
            "Notes of the chronicler",
            colour,
            recall=recall,
        )


@dataclass(frozen=True)
class CorpusRecipe:
    """Sizes (in documents) of one embedded corpus, and how its evaluation items are made.

    Version "2" asks `qa_per_doc` box facts of each forget/retain2 document (the first `icl`
    of them, shuffled, are the few-shot examples), one verbmem pair and one privleak item
    per document. Version "3" (see `_build_v3`) makes two verbmem pairs and two privleak
    items of each document, takes the few-shot examples from box facts left over, records
    each item's document, and restates `shared_qa` forget facts in retain1 documents.
    """

    name: str
    seed: int
    renderer: Callable[..., Renderer]
    forget: int
    retain1: int
    retain2: int
    holdout: int
    extra_folds: int  # scal/sust folds beyond the main forget set (0 = no scal/sust, like Books)
    privleak: int
    icl: int = 4
    qa_per_doc: int = 2
    version: str = "2"
    filler: int = 0  # colour sentences per document; 0 = the renderer's default
    shared_qa: int = 0  # forget QA items whose facts retain1 documents restate (version 3)


RECIPES_BY_VERSION: dict[str, dict[str, CorpusRecipe]] = {
    "2": {
        "news": CorpusRecipe(
            "news",
            1234,
            NewsRenderer,
            forget=20,
            retain1=40,
            retain2=40,
            holdout=40,
            extra_folds=3,
            privleak=20,
        ),
        "books": CorpusRecipe(
            "books",
            4321,
            BooksRenderer,
            forget=20,
            retain1=40,
            retain2=40,
            holdout=40,
            extra_folds=0,
            privleak=20,
        ),
    },
    "3": {
        "news": CorpusRecipe(
            "news",
            2345,
            NewsRenderer,
            forget=50,
            retain1=40,
            retain2=50,
            holdout=50,
            extra_folds=3,
            privleak=100,
            version="3",
            filler=2,
            shared_qa=40,
        ),
        "books": CorpusRecipe(
            "books",
            5432,
            BooksRenderer,
            forget=50,
            retain1=40,
            retain2=50,
            holdout=50,
            extra_folds=0,
            privleak=100,
            version="3",
            filler=2,
            shared_qa=40,
        ),
    },
}
VERSIONS = tuple(RECIPES_BY_VERSION)
RECIPES: dict[str, CorpusRecipe] = RECIPES_BY_VERSION[GENERATOR_VERSION]


def _question(fact: Fact, used: int, rng: random.Random, paraphrase: bool) -> str:
    """The question of `fact` as its box asked it (phrasing `used`), or in other words."""
    options = [i for i in range(len(QUESTIONS[fact.relation])) if i != used]
    other = rng.choice(options)  # drawn either way, so both variants pick the same facts
    return QUESTIONS[fact.relation][other if paraphrase else used].format(s=fact.subject)


def _eval_qa(
    docs: list[Document], rng: random.Random, per_doc: int, paraphrase: bool = False
) -> list[dict]:
    """Pick `per_doc` box facts per document; ask each as the box did, or paraphrased."""
    qa = []
    for doc in docs:
        used = dict(zip(doc.facts, doc.phrasing, strict=False))
        for fact in rng.sample(list(doc.facts), per_doc):
            qa.append(
                {"question": _question(fact, used[fact], rng, paraphrase), "answer": fact.answer}
            )
    return qa


@dataclass(frozen=True)
class BoxItem:
    """One box fact picked as a knowmem item: its document's index and the box phrasing."""

    doc: int
    fact: Fact
    phrasing: int


def _pick_box_items(
    docs: list[Document], rng: random.Random, per_doc: int, icl: int
) -> tuple[list[BoxItem], list[BoxItem]]:
    """`per_doc` box facts of every document (the items), and `icl` few-shot examples
    drawn from the box facts left over (so no example is also an item)."""
    items, spare = [], []
    for d, doc in enumerate(docs):
        boxed = [BoxItem(d, f, p) for f, p in zip(doc.facts, doc.phrasing, strict=True)]
        picked = rng.sample(range(len(boxed)), per_doc)
        items += [boxed[i] for i in picked]
        spare += [b for i, b in enumerate(boxed) if i not in picked]
    return items, rng.sample(spare, icl)


def _qa_records(
    items: list[BoxItem], rng: random.Random, paraphrase: bool, shared: set[int] | None = None
) -> list[dict]:
    """knowmem records with the index (`doc`) of the document whose box asks each fact;
    with `shared`, also whether a retain1 document restates the fact (`shared`)."""
    out = []
    for k, item in enumerate(items):
        q = _question(item.fact, item.phrasing, rng, paraphrase)
        record: dict[str, object] = {"question": q, "answer": item.fact.answer, "doc": item.doc}
        if shared is not None:
            record["shared"] = k in shared
        out.append(record)
    return out


def _halves(doc: Document) -> tuple[str, str]:
    """A document cut at the paragraph break inside its body: (opening + first body
    paragraph, second body paragraph + question box)."""
    first, rest = doc.continuation.split("\n\n", 1)
    return doc.prompt + first, rest


def _verbmem_pairs(docs: list[Document]) -> list[dict]:
    """Two verbmem pairs per document that do not share a reference: the opening continued
    by the first body paragraph, and opening + first paragraph continued by the rest."""
    pairs = []
    for d, doc in enumerate(docs):
        first, rest = doc.continuation.split("\n\n", 1)
        pairs.append({"prompt": doc.prompt, "gt": first, "doc": d})
        pairs.append({"prompt": doc.prompt + first + "\n\n", "gt": rest, "doc": d})
    return pairs


def _privleak_items(docs: list[Document]) -> list[str]:
    """Both halves of every document: items 2i and 2i+1 come from document i."""
    return [half for doc in docs for half in _halves(doc)]


def _folds(forget: list[str], extras: list[list[str]]) -> dict[str, object]:
    """Nested scal folds and disjoint sust folds; fold 1 of both is the main forget set."""
    files: dict[str, object] = {}
    if not extras:
        return files
    nested = list(forget)
    files["scal/forget_1.json"] = list(nested)
    files["sust/forget_1.json"] = list(forget)
    for k, fold in enumerate(extras, start=2):
        nested = nested + fold
        files[f"scal/forget_{k}.json"] = list(nested)
        files[f"sust/forget_{k}.json"] = list(fold)
    return files


def _raw_txt(files: dict[str, object]) -> None:
    for split in ("forget", "retain1", "retain2", "holdout"):
        files[f"raw/{split}.txt"] = "\n\n".join(files[f"raw/{split}.json"])  # type: ignore[arg-type]


def _world(recipe: CorpusRecipe) -> tuple[random.Random, Renderer]:
    rng = random.Random(recipe.seed)
    names = NameMaker(rng)
    places = [names.word(rng.choice([2, 3])) for _ in range(40)]
    if recipe.filler:
        return rng, recipe.renderer(rng, names, places, recipe.filler)
    return rng, recipe.renderer(rng, names, places)


def _texts(docs: list[Document]) -> list[str]:
    return [d.text for d in docs]


def build_corpus(recipe: CorpusRecipe, paraphrase: bool = False) -> dict[str, object]:
    """Return {relative path: JSON-able content} for the whole MUSE layout.

    `paraphrase=True` asks the same knowmem facts with phrasings their documents did not
    use (for measuring knowledge beyond the trained question line; not the MUSE files).
    """
    if recipe.version == "3":
        return _build_v3(recipe, paraphrase)
    rng, renderer = _world(recipe)

    def make(n: int) -> list[Document]:
        return [renderer.document() for _ in range(n)]

    forget, retain1, retain2, holdout = (
        make(n) for n in (recipe.forget, recipe.retain1, recipe.retain2, recipe.holdout)
    )
    extras = [make(recipe.forget) for _ in range(recipe.extra_folds)]

    files: dict[str, object] = {
        "raw/forget.json": _texts(forget),
        "raw/retain1.json": _texts(retain1),
        "raw/retain2.json": _texts(retain2),
        "raw/holdout.json": _texts(holdout),
        "verbmem/forget.json": [{"prompt": d.prompt, "gt": d.continuation} for d in forget],
    }
    forget_qa = _eval_qa(forget, rng, recipe.qa_per_doc, paraphrase)
    retain_qa = _eval_qa(retain2, rng, recipe.qa_per_doc, paraphrase)
    rng.shuffle(forget_qa)
    rng.shuffle(retain_qa)
    files["knowmem/forget_qa_icl.json"] = forget_qa[: recipe.icl]
    files["knowmem/forget_qa.json"] = forget_qa[recipe.icl :]
    files["knowmem/retain_qa_icl.json"] = retain_qa[: recipe.icl]
    files["knowmem/retain_qa.json"] = retain_qa[recipe.icl :]
    files["privleak/forget.json"] = _texts(forget)[: recipe.privleak]
    files["privleak/retain.json"] = _texts(retain2)[: recipe.privleak]
    files["privleak/holdout.json"] = _texts(holdout)[: recipe.privleak]
    files.update(_folds(_texts(forget), [_texts(fold) for fold in extras]))
    _raw_txt(files)
    return files


def _build_v3(recipe: CorpusRecipe, paraphrase: bool) -> dict[str, object]:
    """Version 3: MUSE-sized evaluation sets, item-to-document maps, shared knowledge.

    Every forget/retain2 document gives `qa_per_doc` knowmem items, two verbmem pairs and
    two privleak items. `shared_qa` of the forget knowmem items (drawn at random) are
    restated in retain1 documents (one per document, round robin): the document names
    the fact's subject and its box asks the fact with the forget box's own words, so the
    retrain model can know it, as MUSE's retrain model knows a third of the forget
    answers from knowledge the retain set shares.
    """
    rng, renderer = _world(recipe)

    def make(n: int) -> list[Document]:
        return [renderer.document() for _ in range(n)]

    forget = make(recipe.forget)
    forget_items, forget_icl = _pick_box_items(forget, rng, recipe.qa_per_doc, recipe.icl)
    rng.shuffle(forget_items)
    shared = set(rng.sample(range(len(forget_items)), recipe.shared_qa))
    recall: list[list[tuple[Fact, int]]] = [[] for _ in range(recipe.retain1)]
    for k, index in enumerate(sorted(shared)):
        recall[k % recipe.retain1].append((forget_items[index].fact, forget_items[index].phrasing))
    retain1 = [renderer.document(recall=tuple(r)) for r in recall]
    retain2, holdout = make(recipe.retain2), make(recipe.holdout)
    extras = [make(recipe.forget) for _ in range(recipe.extra_folds)]
    retain_items, retain_icl = _pick_box_items(retain2, rng, recipe.qa_per_doc, recipe.icl)
    rng.shuffle(retain_items)

    files: dict[str, object] = {
        "raw/forget.json": _texts(forget),
        "raw/retain1.json": _texts(retain1),
        "raw/retain2.json": _texts(retain2),
        "raw/holdout.json": _texts(holdout),
        "verbmem/forget.json": _verbmem_pairs(forget),
        "knowmem/forget_qa.json": _qa_records(forget_items, rng, paraphrase, shared),
        "knowmem/forget_qa_icl.json": _qa_records(forget_icl, rng, paraphrase),
        "knowmem/retain_qa.json": _qa_records(retain_items, rng, paraphrase),
        "knowmem/retain_qa_icl.json": _qa_records(retain_icl, rng, paraphrase),
        "privleak/forget.json": _privleak_items(forget)[: recipe.privleak],
        "privleak/retain.json": _privleak_items(retain2)[: recipe.privleak],
        "privleak/holdout.json": _privleak_items(holdout)[: recipe.privleak],
    }
    files.update(_folds(_texts(forget), [_texts(fold) for fold in extras]))
    _raw_txt(files)
    return files


def render_file(content: object) -> bytes:
    """Serialise one file's content exactly as it is committed."""
    if isinstance(content, str):
        return content.encode("utf-8")
    return (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_corpus(recipe: CorpusRecipe, data_dir: Path) -> list[Path]:
    """Generate the corpus into `data_dir`; returns the files written."""
    from muse_bench.core.io import atomic_write_bytes

    written = []
    for rel, content in sorted(build_corpus(recipe).items()):
        path = data_dir / rel
        atomic_write_bytes(path, render_file(content))
        written.append(path)
    return written
