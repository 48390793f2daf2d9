"""Deterministic generator for the sample data that ships inside the `embedder` package.

Everything here is invented for this project: a procedurally generated fictional world (companies, towns,
people, web APIs, conversations and chronicles). Nothing is copied from a real data set. Teacher scores are
synthetic: they are computed from the known relevance structure plus seeded noise, shaped like the language
model log-likelihoods that the LLM-Embedder recipe distils from.

Run it with

    python tools/build_sample_data.py            # rewrite embedder/sample_data
    python tools/build_sample_data.py --out DIR  # write them somewhere else

The output depends only on SEED: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Any

from embedder.data.jsonl import write_jsonl_atomic

SEED = 20240611
# the package folder that holds the generated files (this generator is a tool, not runtime code)
HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embedder", "sample_data")

Record = dict[str, Any]


def _rng(name: str) -> random.Random:
    """One independent, reproducible stream per part of the build (integer seeds only)."""
    offset = sum((i + 1) * ord(c) for i, c in enumerate(name))
    return random.Random(SEED * 1000 + offset)


def _r(x: float) -> float:
    return round(float(x), 4)


# ---------------------------------------------------------------------------------------------------------------------
# Made-up names
# ---------------------------------------------------------------------------------------------------------------------

ONSETS = ["B", "D", "K", "M", "T", "V", "S", "R", "L", "N", "H", "G", "F", "P", "Br", "Dr", "Gr", "Tr", "Th",
          "Sh", "Kr", "St", "C", "W", "Pr", "Fl", "Gl", "Sk"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ey"]
CODAS = ["l", "n", "r", "s", "m", "nd", "rk", "ll", "v", "", "", "", "rn", "st"]
ENDINGS = ["mere", "holt", "dane", "wick", "ora", "avel", "ton", "essa", "ford", "stead", "by", "mar", "ven", "rin",
           "ley", "dor", "gate", "moor", "well", "ath", "ick", "el", "und", "arra", "ish", "ovo", "ane", "ire"]

FIRST_NAMES_F = ["Maren", "Ilse", "Nadia", "Orla", "Petra", "Sunniva", "Talia", "Vera", "Wren", "Yara", "Agnes",
                 "Beatrix", "Clara", "Dagny", "Edith", "Freya", "Greta", "Hanne", "Ines", "Juno", "Kaja", "Lotte",
                 "Mina", "Noor", "Ottilie", "Rosa", "Selma", "Thea", "Ulla", "Zofia"]
FIRST_NAMES_M = ["Anselm", "Bram", "Casimir", "Dorian", "Emil", "Felix", "Gideon", "Hugo", "Ivo", "Jasper", "Konrad",
                 "Leif", "Matthias", "Nils", "Oskar", "Piet", "Quentin", "Rufus", "Silas", "Tobias", "Ulrich",
                 "Viggo", "Wendel", "Xaver", "Yannick", "Aurel", "Benedikt", "Cyril", "Desmond", "Elias"]


class Names:
    """Unique invented words and people names drawn from one random stream."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self) -> str:
        while True:
            w = (self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                 + self.rng.choice(ENDINGS)).capitalize()
            if w not in self.used and 5 <= len(w) <= 11:
                self.used.add(w)
                return w

    def person(self, gender: str | None = None) -> tuple[str, str]:
        gender = gender or self.rng.choice("fm")
        first = self.rng.choice(FIRST_NAMES_F if gender == "f" else FIRST_NAMES_M)
        while True:
            full = f"{first} {self.word()}"
            if full not in self.used:
                self.used.add(full)
                return full, gender


# ---------------------------------------------------------------------------------------------------------------------
# Fictional knowledge base shared by qa and convsearch
# ---------------------------------------------------------------------------------------------------------------------

SECTORS = {
    "Optics": ["telescope", "camera lens", "pair of binoculars", "microscope"],
    "Foods": ["oat biscuit", "smoked fish pie", "barley soup", "honey cake"],
    "Textiles": ["wool blanket", "linen shirt", "rain cape", "felt hat"],
    "Robotics": ["warehouse robot", "lawn-mowing robot", "robotic arm", "delivery drone"],
    "Ceramics": ["teapot", "glazed floor tile", "flower vase", "dinner plate"],
    "Instruments": ["violin", "accordion", "cello", "upright piano"],
    "Cycles": ["cargo bike", "folding bicycle", "tandem", "mountain bike"],
    "Brewing": ["pale ale", "dry cider", "oatmeal stout", "ginger beer"],
    "Motors": ["tractor", "scooter", "minibus", "electric van"],
    "Toys": ["wooden train set", "box kite", "puzzle box", "rocking horse"],
}
PRODUCT_DESCS = ["which sells best before the winter holidays", "which is praised for how long it lasts",
                 "which is sold mostly through small independent shops", "which was first sketched on an envelope",
                 "which is exported to more than twenty countries", "which is still assembled by hand"]
JOBS = ["ferry mechanic", "schoolteacher", "bank clerk", "ship's cook", "postwoman", "chemist", "carpenter",
        "lighthouse keeper", "tailor", "railway engineer", "nurse", "bookbinder"]
COLOURS = ["red", "blue", "green", "golden", "silver", "black", "white", "orange", "purple", "grey"]
ANIMALS = ["heron", "fox", "otter", "stag", "owl", "salmon", "hare", "lynx", "swan", "badger", "wolf", "crane"]
MONTHS = ["January", "March", "April", "May", "June", "July", "August", "September", "October", "November"]
FESTIVALS = ["Lantern Festival", "Cheese Fair", "Kite Week", "Harvest Parade", "Boat Race", "Folk Music Days",
             "Apple Market", "Midsummer Bonfire", "Oyster Feast", "Winter Light Walk"]
INDUSTRIES = ["fishing", "slate quarrying", "glassmaking", "sheep farming", "shipbuilding", "apple growing",
              "salt panning", "tourism", "clockmaking", "paper milling", "boat repair", "cheese making"]
PROFESSIONS = ["cartographer", "glassblower", "botanist", "composer", "astronomer", "architect", "marine biologist",
               "sculptor", "clockmaker", "linguist", "mountaineer", "photographer"]
WORKS = ["the Atlas of the {W} Coast", "a symphony called 'The {W} Tides'", "the {W} Bridge",
         "a field guide to the mosses of {W}", "the star catalogue known as the {W} Tables",
         "a bronze statue called 'The {W} Fisherman'", "a dictionary of the {W} dialect",
         "the photograph series 'Winters in {W}'", "the {W} Pendulum Clock", "the first ascent of Mount {W}"]
SCHOOLS = ["the {W} Academy of Fine Arts", "{W} University", "the {W} Institute of Technology",
           "the {W} School of Navigation", "the Royal College of {W}", "the {W} Conservatory"]
AWARDS = ["the {W} Medal", "the {W} Prize for Science", "the Golden {W} Award", "the {W} Lifetime Honour",
          "the Order of {W}", "the {W} Fellowship"]

FILLERS = {
    "company": ["Its annual report is printed on recycled paper.", "The firm sponsors a local rowing club.",
                "Staff still take a long lunch on Fridays.", "A small museum on site displays early prototypes.",
                "Its website has barely changed in a decade.", "Apprentices are recruited from nearby schools.",
                "The firm once lost a long court case over a trademark.", "Its canteen is open to the public."],
    "town": ["The old market hall has a copper roof.", "Buses to the coast leave twice a day.",
             "A footpath loops around the old town walls.", "The library stays open late on Thursdays.",
             "Several bakeries compete for the best rye bread.", "Fog often settles over the rooftops in autumn.",
             "The railway station was closed for many years.", "A wooden bridge links the two halves of the centre."],
    "person": ["Friends remembered a dry sense of humour.", "Many letters from this period survive in an archive.",
               "A biography published decades later revived interest.", "Few photographs of this period survive.",
               "Neighbours recalled long evening walks by the harbour.", "A documentary about this life aired on radio.",
               "Several notebooks were lost in a house fire.", "Students still visit the old study room."],
}

OVERVIEWS = {
    "company": ["{E} is a firm that rarely advertises and relies on word of mouth.",
                "{E} appears in most regional business guides as a steady, unglamorous employer.",
                "{E} is privately owned and publishes very little about itself.",
                "Trade magazines describe {E} as quietly successful."],
    "town": ["{E} is a small town popular with walkers and cyclists.",
             "{E} is a quiet place that most travellers pass through without stopping.",
             "Guidebooks describe {E} as charming but easy to miss.",
             "{E} is the kind of town where everyone seems to know everyone."],
    "person": ["{E} is the subject of two biographies and a radio play.",
               "Little was written about {E} during their lifetime.",
               "{E} is a name better known to specialists than to the public.",
               "Historians have only recently begun to study the life of {E}."],
}

# Each attribute: query phrasings (full and conversational follow-up), passage phrasings, and answers.
ATTRS: dict[str, list[dict[str, Any]]] = {
    "company": [
        dict(name="founded_year",
             q=["When was {E} founded?", "In what year was {E} established?", "What year did {E} start out?",
                "How long has {E} been around?", "{E} founding year", "when did {E} open for business"],
             p=["{E} opened its first workshop in {year}, in a rented room above a bakery.",
                "The first invoice ever issued by {E} is dated {year}.",
                "{E} has been trading without interruption since {year}.",
                "Records show that {E} began trading in {year} with just three employees."],
             a="{year}", cq=["When did it start?", "How old is the company?", "What year was it set up?"],
             ca="It has been trading since {year}."),
        dict(name="founder",
             q=["Who founded {E}?", "Who started {E}?", "Who set up {E} in the first place?",
                "Who is the founder of {E}?", "{E} founder", "which person created {E}"],
             p=["{E} was the brainchild of {founder}, a former {founder_job}.",
                "{founder}, who had worked as a {founder_job}, put up the money to create {E}.",
                "It was {founder}, once a {founder_job}, who first had the idea for {E}."],
             a="{founder}", cq=["Who started it?", "Whose idea was the company?", "And who founded it?"],
             ca="It was the idea of {founder}, a former {founder_job}."),
        dict(name="headquarters",
             q=["Where is {E} headquartered?", "In which city is {E} based?", "Where is the head office of {E}?",
                "What town is {E} located in?", "{E} headquarters location", "where does {E} have its main office"],
             p=["{E} runs its business from a converted warehouse in {city}.",
                "The managers of {E} work from an office that overlooks the old square in {city}.",
                "Anyone visiting {E} has to travel to {city}, where the management team sits."],
             a="{city}", cq=["Where is it based?", "Which town are its offices in?", "Where is the company located?"],
             ca="Its offices are in {city}."),
        dict(name="product",
             q=["What does {E} make?", "What is the best-known product of {E}?", "What is {E} famous for selling?",
                "What kind of goods does {E} produce?", "{E} main product", "what can I buy from {E}"],
             p=["Most of the money {E} earns comes from the {product}, {product_desc}.",
                "Shoppers know {E} mainly for the {product}, {product_desc}.",
                "The {product}, {product_desc}, is what made {E} a household name."],
             a="the {product}", cq=["What do they make?", "What is their best-known product?",
                                    "What do they sell?"],
             ca="They are best known for the {product}."),
        dict(name="employees",
             q=["How many people work at {E}?", "How many employees does {E} have?",
                "How big is the workforce at {E}?", "What is the headcount of {E}?", "{E} number of staff",
                "how many staff are on the payroll of {E}"],
             p=["{E} has a payroll of roughly {employees} people spread over several sites.",
                "Around {employees} workers are on the books at {E}.",
                "With about {employees} staff, {E} is one of the larger employers in the region."],
             a="about {employees}", cq=["How many people work there?", "How big is the company?",
                                        "How many staff does it have?"],
             ca="About {employees} people work there."),
        dict(name="ceo",
             q=["Who runs {E} today?", "Who is the chief executive of {E}?", "Who is the current CEO of {E}?",
                "Who is in charge of {E} now?", "{E} current boss", "who leads {E} at the moment"],
             p=["Since {ceo_year}, day-to-day decisions at {E} have been made by {ceo}.",
                "{ceo} took over the top job at {E} in {ceo_year}.",
                "The board of {E} appointed {ceo} as managing director in {ceo_year}."],
             a="{ceo}", cq=["Who runs it now?", "Who is the boss there today?", "Who is in charge these days?"],
             ca="{ceo} has been in charge since {ceo_year}."),
        dict(name="emblem",
             q=["What is the logo of {E}?", "What animal appears on the emblem of {E}?",
                "What does the {E} logo look like?", "What is the symbol of {E}?", "{E} logo",
                "which animal is on the {E} badge"],
             p=["A {colour} {animal} is painted on every delivery van that {E} owns.",
                "The crest of {E} shows a {colour} {animal} above the company name.",
                "Packaging from {E} always carries a small {colour} {animal}."],
             a="a {colour} {animal}", cq=["What is its logo?", "What animal is on its emblem?",
                                          "What does their symbol look like?"],
             ca="Their emblem is a {colour} {animal}."),
    ],
    "town": [
        dict(name="river",
             q=["Which river flows through {E}?", "What river is {E} on?", "Is there a river in {E}, and what is it called?",
                "Name the river that runs past {E}.", "{E} river", "what waterway passes through {E}"],
             p=["{E} grew up around a ford on the {river}.", "The old mills of {E} were powered by the {river}.",
                "Barges on the {river} still tie up at the quay in {E}."],
             a="the {river}", cq=["Which river is it on?", "Is there a river there?", "What river runs through it?"],
             ca="It lies on the {river}."),
        dict(name="population",
             q=["How many people live in {E}?", "What is the population of {E}?", "How big is {E}?",
                "How many inhabitants does {E} have?", "{E} population", "how many residents are there in {E}"],
             p=["About {population} residents call {E} home.", "The last census counted {population} people in {E}.",
                "{E} is home to roughly {population} people."],
             a="about {population}", cq=["How many people live there?", "How big is it?",
                                         "What is its population?"],
             ca="Roughly {population} people live there."),
        dict(name="festival",
             q=["What festival is {E} known for?", "What celebration takes place in {E} every year?",
                "Is there an annual event in {E}?", "What is the big yearly party in {E}?", "{E} festival",
                "when is the best time to visit {E} for a celebration"],
             p=["Every {month}, {E} hosts the {festival}, which fills the streets with visitors.",
                "The {festival} has been held in {E} each {month} for generations.",
                "Crowds come to {E} in {month} for the {festival}."],
             a="the {festival}", cq=["Does it have a festival?", "What do they celebrate there each year?",
                                     "Is there a yearly event?"],
             ca="Each {month} it hosts the {festival}."),
        dict(name="mayor",
             q=["Who is the mayor of {E}?", "Who leads the town council of {E}?",
                "Who is in charge of local government in {E}?", "Who was elected to run {E}?", "{E} mayor",
                "who heads the council in {E}"],
             p=["The council of {E} has been chaired by {mayor} since {mayor_year}.",
                "{mayor} won the {mayor_year} election and now wears the chain of office in {E}.",
                "Local decisions in {E} are signed off by {mayor}, who took office in {mayor_year}."],
             a="{mayor}", cq=["Who is the mayor?", "Who runs the council there?", "Who leads it now?"],
             ca="{mayor} has been mayor since {mayor_year}."),
        dict(name="charter_year",
             q=["When was {E} founded?", "How old is the town of {E}?", "In what year did {E} become a town?",
                "When was {E} first settled?", "{E} founding date", "how far back does the history of {E} go"],
             p=["{E} received its town charter in {year}.",
                "The first houses in {E} were built in {year}, according to parish records.",
                "A royal decree of {year} made {E} an official town."],
             a="{year}", cq=["How old is it?", "When was it founded?", "When did it become a town?"],
             ca="It became a town in {year}."),
        dict(name="industry",
             q=["What is the main industry in {E}?", "What do most people in {E} do for work?",
                "How does {E} make its money?", "What is the economy of {E} based on?", "{E} main industry",
                "what jobs are common in {E}"],
             p=["Most families in {E} earn their living from {industry}.",
                "{Industry} has been the backbone of the economy of {E} for a century.",
                "Walk through {E} and you will see signs of {industry} everywhere."],
             a="{industry}", cq=["What do people there do for work?", "What is its main industry?",
                                 "How does it make its money?"],
             ca="Most people there work in {industry}."),
        dict(name="twin",
             q=["Which town is {E} twinned with?", "What is the sister city of {E}?", "Does {E} have a twin town?",
                "Which partner town does {E} have?", "{E} twin town", "which town has a partnership with {E}"],
             p=["{E} signed a friendship agreement with {twin}, and pupils from both towns exchange visits.",
                "A signpost in the centre of {E} points to its partner town, {twin}.",
                "Since {twin_year}, {E} and {twin} have been formally linked."],
             a="{twin}", cq=["Does it have a twin town?", "Which town is it partnered with?",
                             "Has it got a sister city?"],
             ca="It is twinned with {twin}."),
    ],
    "person": [
        dict(name="birthplace",
             q=["Where was {E} born?", "What is the place of birth of {E}?", "Which town does {E} come from?",
                "Where did {E} grow up?", "{E} birthplace", "where is {E} from originally"],
             p=["{E} arrived as the youngest of four children in a cottage in {birthplace}.",
                "{E} spent a childhood in {birthplace}, above the family shop.",
                "The house in {birthplace} where {E} first saw daylight now carries a blue plaque."],
             a="{birthplace}", cq=["Where was {he} born?", "Where does {he} come from?", "Where did {he} grow up?"],
             ca="{He} grew up in {birthplace}."),
        dict(name="birth_year",
             q=["When was {E} born?", "In what year was {E} born?", "What is the birth year of {E}?",
                "How old would {E} be today?", "{E} date of birth", "what year was {E} born in"],
             p=["{E} came into the world in the winter of {birth_year}.",
                "Parish registers record the baptism of {E} in {birth_year}.",
                "{E}, a child of {birth_year}, was the first in the family to learn to read."],
             a="{birth_year}", cq=["When was {he} born?", "How old would {he} be now?", "What year was {he} born?"],
             ca="{He} was born in {birth_year}."),
        dict(name="profession",
             q=["What did {E} do for a living?", "What was the profession of {E}?", "What was the job of {E}?",
                "What kind of work was {E} known for?", "{E} occupation", "what did {E} work as"],
             p=["{E} spent four decades working as a {profession}.",
                "Trained as a {profession}, {E} rarely took a day off.",
                "Colleagues described {E} as the most careful {profession} of the age."],
             a="{profession}", cq=["What did {he} do for a living?", "What was {his} job?",
                                   "What was {his} profession?"],
             ca="{He} worked as a {profession}."),
        dict(name="famous_work",
             q=["What is {E} best known for?", "What is the most famous work of {E}?", "Which work made {E} famous?",
                "What did {E} create that people remember?", "{E} famous work", "what is {E} remembered for"],
             p=["The reputation of {E} rests on {work}.", "Today {E} is remembered above all for {work}.",
                "Critics still rank {work} as the finest achievement of {E}."],
             a="{work}", cq=["What is {he} best known for?", "What is {his} most famous work?",
                             "What made {him} famous?"],
             ca="{He} is remembered for {work}."),
        dict(name="education",
             q=["Where did {E} study?", "Which university did {E} attend?", "Where was {E} educated?",
                "What school did {E} graduate from?", "{E} education", "where did {E} go to college"],
             p=["{E} trained at {school}, graduating near the top of the class.",
                "After leaving home, {E} enrolled at {school}.",
                "Teachers at {school} remembered {E} as a restless student."],
             a="{school}", cq=["Where did {he} study?", "Which university did {he} go to?",
                               "Where was {he} educated?"],
             ca="{He} studied at {school}."),
        dict(name="award",
             q=["What award did {E} win?", "Which prize was {E} given?", "Did {E} receive any honours?",
                "What was the biggest award of {E}?", "{E} awards", "which medal did {E} receive"],
             p=["In {award_year}, {E} was presented with {award}.", "{Award} went to {E} in {award_year}.",
                "{E} accepted {award} in {award_year} but skipped the ceremony."],
             a="{award}", cq=["Did {he} win any awards?", "Which prize did {he} get?", "Was {he} ever honoured?"],
             ca="{He} received {award} in {award_year}."),
        dict(name="deathplace",
             q=["Where did {E} die?", "Where did {E} spend the final years?", "In which town did {E} pass away?",
                "Where is {E} buried?", "{E} place of death", "where did {E} live at the end of life"],
             p=["{E} spent the final years in {deathplace} and died there in {death_year}.",
                "{E} died in {deathplace} in {death_year}, surrounded by notebooks.",
                "A small grave in {deathplace} marks where {E} was laid to rest."],
             a="{deathplace}", cq=["Where did {he} die?", "Where did {he} spend {his} last years?",
                                   "Where is {he} buried?"],
             ca="{He} died in {deathplace}."),
    ],
}

COMPANY_SUFFIXES = list(SECTORS)
QUERY_PREFIXES = ["", "", "", "", "", "Quick question: ", "I keep forgetting this. ", "For a school project: ",
                  "Trivia night help! ", "Settling a bet here. "]


LOWERABLE = {"what", "when", "where", "who", "which", "how", "in", "is", "does", "did", "name", "can", "search",
             "are", "look", "fetch", "check", "show", "give", "find", "browse", "tell", "read", "the", "i'm",
             "a", "and", "has", "have", "was", "were", "whose", "fetch", "it", "they"}


def _lcfirst(s: str) -> str:
    """Lower-case the first letter when the sentence starts with an ordinary word (never a name or "I")."""
    first = s.split(" ", 1)[0].lower().rstrip(",;:")
    if first in LOWERABLE and first != "i'm":
        return s[:1].lower() + s[1:]
    return s


def _make_entities(names: Names, rng: random.Random, n_company: int, n_town: int, n_person: int) -> list[Record]:
    """Entities with every slot their attribute templates need. Towns come first so others can refer to them."""
    towns = [names.word() for _ in range(n_town)]
    extra_towns = [names.word() for _ in range(40)]  # places that are not entities themselves
    all_towns = towns + extra_towns
    # Some company names share their first word, so that the name alone does not pick the passage.
    shared = [names.word() for _ in range(max(1, n_company // 6))]
    ents: list[Record] = []
    for i in range(n_company):
        sector = COMPANY_SUFFIXES[i % len(COMPANY_SUFFIXES)]
        first = shared[i % len(shared)] if rng.random() < 0.35 else names.word()
        name = f"{first} {sector}"
        while any(e["name"] == name for e in ents):
            name = f"{names.word()} {sector}"
        year = rng.randint(1850, 1995)
        ents.append(dict(kind="company", name=name, slots=dict(
            year=year, founder=names.person()[0], founder_job=rng.choice(JOBS), city=rng.choice(all_towns),
            product=f"{names.word()} {rng.choice(SECTORS[sector])}", product_desc=rng.choice(PRODUCT_DESCS),
            employees=f"{rng.randint(3, 95) * 10:,}", ceo=names.person()[0], ceo_year=rng.randint(max(year + 5, 1990), 2022),
            colour=rng.choice(COLOURS), animal=rng.choice(ANIMALS))))
    for t in towns:
        year = rng.randint(1100, 1890)
        ents.append(dict(kind="town", name=t, slots=dict(
            river=f"{names.word()} River", population=f"{rng.randint(12, 900) * 100:,}", month=rng.choice(MONTHS),
            festival=f"{names.word()} {rng.choice(FESTIVALS)}" if rng.random() < 0.5 else rng.choice(FESTIVALS),
            mayor=names.person()[0], mayor_year=rng.randint(2008, 2023), year=year,
            industry=rng.choice(INDUSTRIES), twin=rng.choice([x for x in all_towns if x != t]),
            twin_year=rng.randint(1955, 2015))))
    for _ in range(n_person):
        pname, gender = names.person()
        by = rng.randint(1780, 1950)
        ents.append(dict(kind="person", name=pname, gender=gender, slots=dict(
            birthplace=rng.choice(all_towns), birth_year=by, profession=rng.choice(PROFESSIONS),
            work=rng.choice(WORKS).format(W=names.word()), school=rng.choice(SCHOOLS).format(W=names.word()),
            award=rng.choice(AWARDS).format(W=names.word()), award_year=by + rng.randint(30, 60),
            deathplace=rng.choice(all_towns), death_year=by + rng.randint(55, 90))))
    for e in ents:
        s = e["slots"]
        if e["kind"] == "town":
            s["Industry"] = s["industry"].capitalize()
        if e["kind"] == "person":
            s["Award"] = s["award"][0].upper() + s["award"][1:]
            f = e["gender"] == "f"
            s.update(he="she" if f else "he", He="She" if f else "He", his="her" if f else "his",
                     him="her" if f else "him")
    return ents


def _fmt(template: str, ent: Record) -> str:
    return template.format(E=ent["name"], **ent["slots"])


def _make_passages(ents: list[Record], rng: random.Random, with_title_in_text: bool = True) -> list[Record]:
    """One passage per (entity, attribute) plus one overview per entity, shuffled into a corpus."""
    rows: list[Record] = []
    for ent in ents:
        kind = ent["kind"]
        for spec in ATTRS[kind]:
            text = _fmt(rng.choice(spec["p"]), ent)
            if rng.random() < 0.5:
                text += " " + rng.choice(FILLERS[kind])
            rows.append(dict(title=ent["name"], text=text, _ent=ent["name"], _attr=spec["name"]))
        text = _fmt(rng.choice(OVERVIEWS[kind]), ent) + " " + rng.choice(FILLERS[kind])
        rows.append(dict(title=ent["name"], text=text, _ent=ent["name"], _attr="overview"))
    rng.shuffle(rows)
    return rows


def _index(rows: list[Record]) -> dict[tuple[str, str], int]:
    return {(r["_ent"], r["_attr"]): i for i, r in enumerate(rows)}


def _public(rows: list[Record]) -> list[Record]:
    return [{"title": r["title"], "text": r["text"]} for r in rows]


def _split_entities(ents: list[Record], rng: random.Random, test_frac: float) -> tuple[list[Record], list[Record]]:
    train, test = [], []
    for kind in ("company", "town", "person"):
        group = [e for e in ents if e["kind"] == kind]
        rng.shuffle(group)
        n_test = round(len(group) * test_frac)
        test += group[:n_test]
        train += group[n_test:]
    return train, test


def _sample_pairs(ents: list[Record], n: int, rng: random.Random, per_entity_max: int) -> list[tuple[Record, dict]]:
    """n distinct (entity, attribute) pairs spread over the entities."""
    pairs = [(e, spec) for e in ents for spec in ATTRS[e["kind"]]]
    rng.shuffle(pairs)
    used: dict[str, int] = {}
    out = []
    for e, spec in pairs:
        if used.get(e["name"], 0) >= per_entity_max:
            continue
        used[e["name"]] = used.get(e["name"], 0) + 1
        out.append((e, spec))
        if len(out) == n:
            break
    return out


def _qa_query(ent: Record, spec: dict, rng: random.Random) -> str:
    q = _fmt(rng.choice(spec["q"]), ent)
    prefix = rng.choice(QUERY_PREFIXES)
    return prefix + (_lcfirst(q) if prefix.endswith(": ") else q)


# ---------------------------------------------------------------------------------------------------------------------
# qa
# ---------------------------------------------------------------------------------------------------------------------

def build_qa() -> dict[str, list[Record]]:
    rng = _rng("qa")
    names = Names(rng)
    ents = _make_entities(names, rng, n_company=60, n_town=50, n_person=50)
    rows = _make_passages(ents, rng)
    idx = _index(rows)
    train_ents, test_ents = _split_entities(ents, rng, test_frac=0.25)
    train_names = {e["name"] for e in train_ents}
    keys = [f"{r['title']} {r['text']}" for r in rows]

    def record(ent: Record, spec: dict, qid: int, query: str) -> Record:
        pos_i = idx[(ent["name"], spec["name"])]
        same_ent = [idx[(ent["name"], s["name"])] for s in ATTRS[ent["kind"]] if s["name"] != spec["name"]]
        same_ent.append(idx[(ent["name"], "overview")])
        same_attr = [idx[(e["name"], spec["name"])] for e in train_ents
                     if e["kind"] == ent["kind"] and e["name"] != ent["name"]]
        same_attr = rng.sample(same_attr, 5)
        taken = set(same_ent) | set(same_attr) | {pos_i}
        pool = [i for i, r in enumerate(rows) if r["_ent"] in train_names and i not in taken]
        rand = rng.sample(pool, rng.randint(5, 9))
        scores = {pos_i: rng.gauss(-0.9, 0.45)}
        for i in same_ent:
            scores[i] = rng.gauss(-2.6 if rows[i]["_attr"] != "overview" else -2.3, 0.6)
        for i in same_attr:
            scores[i] = rng.gauss(-3.6, 0.7)
        for i in rand:
            scores[i] = rng.gauss(-6.0, 1.1)
        neg = same_ent + same_attr + rand
        rng.shuffle(neg)
        return {"query": query, "query_id": qid, "answers": [_fmt(spec["a"], ent)], "pos": [keys[pos_i]],
                "neg": [keys[i] for i in neg], "pos_index": [pos_i], "neg_index": neg, "task": "qa",
                "teacher_scores": [_r(min(scores[i], -0.01)) for i in [pos_i] + neg]}

    train = [record(e, s, 1000 + k, _qa_query(e, s, rng))
             for k, (e, s) in enumerate(_sample_pairs(train_ents, 300, rng, per_entity_max=3))]
    test = []
    for k, (e, s) in enumerate(_sample_pairs(test_ents, 60, rng, per_entity_max=2)):
        test.append({"query": _qa_query(e, s, rng), "query_id": 5000 + k, "pos_index": [idx[(e["name"], s["name"])]],
                     "answers": [_fmt(s["a"], e)], "task": "qa"})
    return {"qa/train.json": train, "qa/test.json": test, "qa/corpus.json": _public(rows)}


# ---------------------------------------------------------------------------------------------------------------------
# convsearch: multi-turn conversations about the same kind of world (a separate set of entities)
# ---------------------------------------------------------------------------------------------------------------------

CONV_OPENERS = ["What can you tell me about {E}?", "Have you heard of {E}?", "Tell me about {E}.",
                "I came across the name {E} today. Any idea?", "Who or what is {E}?"]
CONV_INTROS = {
    "company": ["It is {desc}.", "It's {desc} that few people outside the trade know.",
                "As far as I know, it is {desc}."],
    "town": ["It is a small town.", "It's a town that most travellers pass through.", "It is a quiet little town."],
    "person": ["{He} is a historical figure who is not very well known.",
               "{He} is someone historians have only recently begun to study.",
               "Not many people remember {him} today."],
}
SECTOR_DESC = {"Optics": "an optics maker", "Foods": "a food producer", "Textiles": "a textile firm",
               "Robotics": "a robotics company", "Ceramics": "a pottery firm", "Instruments": "an instrument maker",
               "Cycles": "a bicycle maker", "Brewing": "a brewery", "Motors": "a vehicle manufacturer",
               "Toys": "a toy maker"}


def build_convsearch() -> dict[str, list[Record]]:
    rng = _rng("convsearch")
    names = Names(rng)
    ents = _make_entities(names, rng, n_company=40, n_town=35, n_person=35)
    for e in ents:
        if e["kind"] == "company":
            e["slots"]["desc"] = SECTOR_DESC[e["name"].rsplit(" ", 1)[1]]
    rows = _make_passages(ents, rng)
    idx = _index(rows)
    train_ents, test_ents = _split_entities(ents, rng, test_frac=0.25)
    train_names = {e["name"] for e in train_ents}

    def conversation(ent: Record) -> tuple[str, dict, list[int]]:
        specs = ATTRS[ent["kind"]][:]
        rng.shuffle(specs)
        turns: list[str] = []
        mentioned: list[int] = []
        opener = rng.random() < 0.6
        if opener:
            turns += [_fmt(rng.choice(CONV_OPENERS), ent), _fmt(rng.choice(CONV_INTROS[ent["kind"]]), ent)]
        n_prev = rng.choice([0, 0, 1, 1, 2]) if opener else rng.choice([1, 1, 1, 2])
        for j, spec in enumerate(specs[:n_prev]):
            first = not turns and j == 0
            q = _fmt(rng.choice(spec["q"]), ent) if first or rng.random() < 0.3 else _fmt(rng.choice(spec["cq"]), ent)
            q = q[0].upper() + q[1:]
            if not q.endswith(("?", ".")):
                q += "?"
            turns += [q, _fmt(spec["ca"], ent)]
            mentioned.append(idx[(ent["name"], spec["name"])])
        final = specs[n_prev]
        if rng.random() < 0.35:  # sometimes the user names the entity again
            q = _fmt(rng.choice([q for q in final["q"] if q[0].isupper()]), ent)
        else:
            q = _fmt(rng.choice(final["cq"]), ent)
        turns.append(q)
        return " ".join(turns), final, mentioned

    seen: set[str] = set()

    def record(ent: Record, qid: int, with_negs: bool) -> Record:
        while True:
            query, spec, mentioned = conversation(ent)
            if query not in seen:
                seen.add(query)
                break
        pos_i = idx[(ent["name"], spec["name"])]
        out: Record = {"query": query, "answers": [_fmt(spec["ca"], ent)], "pos_index": [pos_i], "query_id": qid,
                       "task": "convsearch"}
        if with_negs:
            same_ent = [idx[(ent["name"], s["name"])] for s in ATTRS[ent["kind"]] if s["name"] != spec["name"]]
            same_ent.append(idx[(ent["name"], "overview")])
            same_attr = rng.sample([idx[(e["name"], spec["name"])] for e in train_ents
                                    if e["kind"] == ent["kind"] and e["name"] != ent["name"]], 4)
            taken = set(same_ent) | set(same_attr) | {pos_i}
            pool = [i for i, r in enumerate(rows) if r["_ent"] in train_names and i not in taken]
            neg = list(dict.fromkeys(mentioned + same_ent)) + same_attr + rng.sample(pool, 4)
            neg = neg[:16]
            out.update(pos=[rows[pos_i]["text"]], neg=[rows[i]["text"] for i in neg], neg_index=neg)
        return out

    train_pool = [e for e in train_ents for _ in range(2)]
    rng.shuffle(train_pool)
    train = [record(e, 2000 + k, True) for k, e in enumerate(train_pool[:150])]
    test_pool = test_ents[:]
    rng.shuffle(test_pool)
    test = [record(e, 6000 + k, False) for k, e in enumerate((test_pool * 2)[:40])]
    return {"convsearch/train.json": train, "convsearch/test.json": test, "convsearch/corpus.json": _public(rows)}


# ---------------------------------------------------------------------------------------------------------------------
# tool: user requests vs. API endpoint descriptions
# ---------------------------------------------------------------------------------------------------------------------

# (category, tool name, singular, plural, slug, ways users refer to them, item-name pattern, topics, categories)
RESOURCES = [
    ("Entertainment", "Reelhouse", "movie", "movies", "movies", ["movies", "films", "cinema releases"],
     "the film '{T}'", ["time travel", "a heist", "a haunted lighthouse", "space pirates", "a chess prodigy"],
     ["comedy", "horror", "documentary", "animated"]),
    ("Entertainment", "Bingewise", "TV series", "TV series", "series", ["TV shows", "TV series", "box sets"],
     "the series '{T}'", ["a small-town detective", "a cooking competition", "dragons", "a hospital", "lawyers"],
     ["crime drama", "sitcom", "reality", "fantasy"]),
    ("Books", "Pagewell", "book", "books", "books", ["books", "novels", "paperbacks"],
     "the novel '{T}'", ["sailing", "the history of tea", "a lost city", "beekeeping", "a family secret"],
     ["mystery", "science fiction", "poetry", "biography"]),
    ("Books", "Earshelf", "audiobook", "audiobooks", "audiobooks", ["audiobooks", "narrated books",
     "spoken-word books"], "the audiobook '{T}'", ["sailing", "the history of tea", "a lost city", "beekeeping",
     "stoic philosophy"], ["mystery", "self-help", "history", "children's stories"]),
    ("Travel", "Stayfinder", "hotel", "hotels", "hotels", ["hotels", "hotel rooms", "hotels with room service"],
     "Hotel {T}", ["a sea view", "a rooftop pool", "free parking", "a spa", "a quiet location"],
     ["luxury", "budget", "boutique", "family-friendly"]),
    ("Travel", "Nestaway", "vacation rental", "vacation rentals", "rentals",
     ["holiday homes", "cottages to rent", "vacation rentals"], "the {T} Cottage",
     ["a hot tub", "a garden", "a fireplace", "space for eight people", "a lake view"],
     ["cabin", "beach house", "farmhouse", "apartment"]),
    ("Food", "Panwise", "recipe", "recipes", "recipes", ["recipes", "dishes to cook", "home cooking ideas"],
     "the {T} stew recipe", ["lentils", "leftover rice", "smoked paprika", "pumpkin", "chickpeas"],
     ["vegan", "dessert", "breakfast", "gluten-free"]),
    ("Food", "Tablehop", "restaurant", "restaurants", "restaurants",
     ["restaurants", "places to eat out", "dinner spots"], "{T} Bistro",
     ["outdoor seating", "live jazz", "a tasting menu", "late opening hours", "dumplings"],
     ["Italian", "Ethiopian", "seafood", "vegetarian"]),
    ("Music", "Tunegrid", "song", "songs", "songs", ["songs", "tracks", "music"], "the song '{T}'",
     ["rainy days", "road trips", "heartbreak", "summer nights", "running"], ["jazz", "folk", "hip hop", "classical"]),
    ("Music", "Podlane", "podcast", "podcasts", "podcasts", ["podcasts", "audio shows", "podcast episodes"],
     "the podcast '{T}'", ["true crime", "gardening", "startups", "ancient Rome", "chess"],
     ["comedy", "news", "science", "interview"]),
    ("Gaming", "Playvault", "video game", "video games", "games", ["video games", "console games", "PC games"],
     "the video game '{T}'", ["farming", "underwater exploration", "city building", "racing", "puzzles"],
     ["strategy", "platformer", "role-playing", "co-op"]),
    ("Gaming", "Dicebox", "board game", "board games", "boardgames",
     ["board games", "tabletop games", "family games"], "the board game '{T}'",
     ["trains", "trading spices", "dungeons", "bird watching", "space colonies"],
     ["party", "cooperative", "two-player", "deck-building"]),
    ("Vehicles", "Autolot", "used car", "used cars", "cars", ["used cars", "second-hand cars", "pre-owned cars"],
     "the {T} hatchback", ["low mileage", "seven seats", "an electric engine", "a tow bar", "automatic gears"],
     ["SUV", "estate", "convertible", "compact"]),
    ("Vehicles", "Pedalmart", "bicycle", "bicycles", "bikes", ["bikes", "bicycles", "commuter bikes"],
     "the {T} bike", ["a child seat", "disc brakes", "a carbon frame", "a front basket", "electric assist"],
     ["road", "gravel", "cargo", "kids"]),
    ("Real Estate", "Rentnest", "rental apartment", "rental apartments", "apartments",
     ["flats to rent", "apartments for rent", "rental flats"], "the {T} Street flat",
     ["a balcony", "pets allowed", "a short commute", "a dishwasher", "furnished rooms"],
     ["studio", "two-bedroom", "shared", "penthouse"]),
    ("Real Estate", "Homescout", "house for sale", "houses for sale", "homes",
     ["houses for sale", "homes for sale", "properties for sale"], "the house at {T} Lane",
     ["a large garden", "a garage", "solar panels", "a cellar", "a good school nearby"],
     ["detached", "terraced", "bungalow", "new build"]),
    ("Leisure", "Gallerygo", "museum", "museums", "museums", ["museums", "galleries", "exhibitions to visit"],
     "the {T} Museum", ["dinosaurs", "old maps", "modern art", "steam engines", "textiles"],
     ["art", "history", "science", "children's"]),
    ("Leisure", "Trailhead", "hiking trail", "hiking trails", "trails", ["hikes", "walking routes", "hiking trails"],
     "the {T} Ridge trail", ["waterfalls", "wild ponies", "a summit view", "old mines", "shade in summer"],
     ["easy", "dog-friendly", "multi-day", "loop"]),
    ("Drinks", "Cellarnote", "wine", "wines", "wines", ["wines", "bottles of wine", "dinner wines"],
     "the {T} Riesling", ["oak", "citrus notes", "low sulphites", "a long finish", "pairing with cheese"],
     ["red", "white", "sparkling", "rosé"]),
    ("Drinks", "Hopfinder", "craft beer", "craft beers", "beers", ["craft beers", "local beers", "hoppy beers"],
     "the {T} Pale Ale", ["grapefruit", "smoked malt", "low alcohol", "coffee notes", "wild yeast"],
     ["IPA", "stout", "lager", "sour"]),
    ("Events", "Gigtix", "concert", "concerts", "concerts", ["concerts", "gigs", "live music nights"],
     "the {T} concert", ["an orchestra", "a reunion tour", "an open-air stage", "a tribute band", "a choir"],
     ["rock", "classical", "electronic", "folk"]),
    ("Events", "Stagepass", "theatre show", "theatre shows", "shows", ["plays", "theatre shows", "musicals"],
     "the play '{T}'", ["Shakespeare", "a murder mystery", "puppets", "a family drama", "tap dancing"],
     ["musical", "comedy", "drama", "opera"]),
    ("Education", "Learnloop", "online course", "online courses", "courses",
     ["online courses", "e-learning classes", "remote classes"], "the course '{T} Fundamentals'",
     ["Python", "watercolour painting", "negotiation", "Spanish", "statistics"],
     ["programming", "languages", "business", "art"]),
    ("Education", "Skillbench", "workshop", "workshops", "workshops",
     ["in-person workshops", "hands-on classes", "weekend workshops"], "the {T} pottery workshop",
     ["woodturning", "bread baking", "bike repair", "screen printing", "knife skills"],
     ["crafts", "cooking", "repair", "photography"]),
    ("Technology", "Appdeck", "mobile app", "mobile apps", "apps", ["apps", "phone apps", "smartphone apps"],
     "the app '{T}'", ["budgeting", "meditation", "habit tracking", "bird song identification", "language flashcards"],
     ["productivity", "health", "finance", "education"]),
    ("Technology", "Plugshelf", "browser extension", "browser extensions", "extensions",
     ["browser extensions", "add-ons for my browser", "browser plugins"], "the extension '{T}'",
     ["blocking trackers", "saving tabs", "dark mode", "grammar checking", "price tracking"],
     ["privacy", "productivity", "accessibility", "shopping"]),
    ("Fashion", "Solestack", "sneaker", "sneakers", "sneakers", ["sneakers", "trainers", "running shoes"],
     "the {T} Runner sneaker", ["wide feet", "recycled materials", "trail grip", "bright colours", "cushioning"],
     ["running", "skate", "basketball", "casual"]),
    ("Fashion", "Coatrack", "jacket", "jackets", "jackets", ["jackets", "coats", "outdoor jackets"],
     "the {T} Parka", ["waterproofing", "a detachable hood", "down filling", "reflective strips", "many pockets"],
     ["rain", "winter", "denim", "leather"]),
]

# Operations shared by every resource: endpoint, description, parameters, and request phrasings.
OPS = [
    dict(name="search", path="/{slug}/search", desc="Search {plural} by keyword and return matching {plural} "
         "with short summaries", req=[("query", "STRING", "Words to look for")],
         opt=[("page", "NUMBER", "Page of results"), ("limit", "NUMBER", "Results per page")],
         q=["Can you find {qn} about {topic}?", "I'm looking for {qn} related to {topic}.",
            "Search for {qn} that involve {topic}.", "Are there any {qn} with {topic}?",
            "I need a list of {qn} featuring {topic}."]),
    dict(name="details", path="/{slug}/{{id}}", desc="Get the full record of one {singular} by its id: name, "
         "description, dates and metadata", req=[("id", "STRING", "Identifier of the {singular}")], opt=[],
         q=["I have the id {id}; pull up everything you know about that one.", "Look up item {id} in {qn} and "
            "give me the complete record.", "What is the full information for the listing with id {id}?",
            "Fetch the details behind id {id}, please."]),
    dict(name="reviews", path="/{slug}/{{id}}/reviews", desc="List user reviews and star ratings for a {singular}",
         req=[("id", "STRING", "Identifier of the {singular}")],
         opt=[("sort", "STRING", "newest or most_helpful"), ("limit", "NUMBER", "Number of reviews")],
         q=["What do people think of {name}? Show me some opinions.", "Is {name} any good according to others?",
            "Read me what other customers wrote about {name}.", "How do people rate {name}?"]),
    dict(name="similar", path="/{slug}/{{id}}/similar", desc="Recommend {plural} that are similar to a given "
         "{singular}", req=[("id", "STRING", "Identifier of the {singular} to start from")],
         opt=[("limit", "NUMBER", "Number of recommendations")],
         q=["I really enjoyed {name}; suggest more like it.", "Find me something in the same spirit as {name}.",
            "What else would I like if {name} was my favourite?", "Give me alternatives to {name} that feel alike."]),
    dict(name="trending", path="/{slug}/trending", desc="List the {plural} that are most popular right now",
         req=[], opt=[("region", "STRING", "Country code"), ("limit", "NUMBER", "Number of results")],
         q=["Which {qn} is everyone talking about this week?", "What are the most popular {qn} at the moment?",
            "Show me what is hot right now in {qn}.", "What {qn} are people going crazy for lately?"]),
    dict(name="price", path="/{slug}/{{id}}/price", desc="Get the current price and availability of a {singular}",
         req=[("id", "STRING", "Identifier of the {singular}")], opt=[("currency", "STRING", "ISO currency code")],
         q=["How much does {name} cost, and can I get it now?", "Check what {name} would set me back.",
            "Is {name} still available, and at what cost?", "Tell me the going rate for {name}."]),
    dict(name="category", path="/{slug}/by-category", desc="List {plural} in a given category such as {cats}",
         req=[("category", "STRING", "Category name")], opt=[("limit", "NUMBER", "Number of results")],
         q=["Show me some {genre} options among {qn}.", "I only want {genre} {qn}; list a few.",
            "Give me a list of {qn} in the {genre} category.", "Browse {genre} {qn} for me."]),
]

TOOL_CONTEXTS = ["", "", "", "I'm planning a weekend with friends. ", "My partner's birthday is coming up. ",
                 "I'm writing a newsletter for my neighbours. ", "I'm bored this evening. ",
                 "We're moving to a new city soon. ", "I'm helping my parents with something. ",
                 "I run a small blog and need material. ", "I have a free afternoon tomorrow. "]
TITLE_WORDS = ["Salt", "Lantern", "Copper", "Winter", "Hollow", "Velvet", "Iron", "Paper", "Silent", "Amber",
               "Northern", "Glass", "Orchard", "Midnight", "Harbour", "Feather", "Stone", "Golden", "Crooked", "Blue"]
TITLE_NOUNS = ["Road", "Garden", "Tide", "Clock", "Mile", "Letter", "Hour", "Bridge", "Fox", "Island", "Kingdom",
               "Song", "Compass", "Orchard", "Lighthouse", "Summer", "River", "Choir", "Mountain", "Door"]


def _params(items: list[tuple[str, str, str]], singular: str) -> str:
    return json.dumps([{"name": n, "type": t, "description": d.format(singular=singular)} for n, t, d in items],
                      ensure_ascii=False)


def build_tool() -> dict[str, list[Record]]:
    rng = _rng("tool")
    names = Names(rng)
    tools: list[Record] = []
    for r_i, (cat, tool, singular, plural, slug, qnouns, name_fmt, topics, cats) in enumerate(RESOURCES):
        for op in OPS:
            desc = op["desc"].format(singular=singular, plural=plural, cats=", ".join(cats[:3]))
            text = (f"{cat}, {tool}, GET {op['path'].format(slug=slug)}, {desc}, required_params: "
                    f"{_params(op['req'], singular)}, optional_params: {_params(op['opt'], singular)}")
            tools.append(dict(text=text, _res=r_i, _op=op["name"]))
    order = list(range(len(tools)))
    rng.shuffle(order)
    tools = [tools[i] for i in order]
    tidx = {(t["_res"], t["_op"]): i for i, t in enumerate(tools)}

    # Slot values are split between train and test so that no test request repeats a training one.
    def item_name(r_i: int) -> str:
        fmt = RESOURCES[r_i][6]
        if "'" in fmt:
            return fmt.format(T=f"{rng.choice(TITLE_WORDS)} {rng.choice(TITLE_NOUNS)}")
        return fmt.format(T=names.word())

    def one_request(r_i: int, op: dict, split: str) -> str:
        _, _, singular, plural, slug, qnouns, _, topics, cats = RESOURCES[r_i]
        topic = topics[-1] if split == "test" and rng.random() < 0.6 else rng.choice(topics[:-1] if split == "train" else topics)
        genre = cats[-1] if split == "test" and rng.random() < 0.6 else rng.choice(cats[:-1] if split == "train" else cats)
        ident = f"{slug[:3]}-{rng.randint(10000, 99999)}"
        return rng.choice(op["q"]).format(qn=rng.choice(qnouns), topic=topic, genre=genre, id=ident,
                                          name=item_name(r_i), singular=singular, plural=plural)

    def request(split: str) -> tuple[str, list[int]]:
        r_i = rng.randrange(len(RESOURCES))
        u = rng.random()
        if u < 0.55:
            ops = [rng.choice(OPS)]
            res = [r_i]
        elif u < 0.9:
            ops = rng.sample(OPS, 2)
            res = [r_i, r_i]
        else:
            ops = rng.sample(OPS, 2)
            res = [r_i, rng.randrange(len(RESOURCES))]
        parts = [one_request(ri, op, split) for ri, op in zip(res, ops)]
        text = rng.choice(TOOL_CONTEXTS) + parts[0]
        if len(parts) > 1:
            text += " " + rng.choice(["Also, ", "After that, ", "And then ", "On top of that, "]) + _lcfirst(parts[1])
        pos = list(dict.fromkeys(tidx[(ri, op["name"])] for ri, op in zip(res, ops)))
        return text, pos

    seen: set[str] = set()

    def unique_request(split: str) -> tuple[str, list[int]]:
        while True:
            text, pos = request(split)
            if text not in seen:
                seen.add(text)
                return text, pos

    train = []
    for k in range(150):
        query, pos = unique_request("train")
        res_of_pos = {tools[i]["_res"] for i in pos}
        sib = {r ^ 1 for r in res_of_pos}  # resources come in sibling pairs: 0/1, 2/3, ...
        hard = [i for i, t in enumerate(tools) if i not in pos and (t["_res"] in res_of_pos or
                (t["_res"] in sib and t["_op"] in {tools[p]["_op"] for p in pos}))]
        hard = rng.sample(hard, min(len(hard), 7))
        others = [i for i in range(len(tools)) if i not in pos and i not in hard]
        neg = hard + rng.sample(others, rng.randint(4, 6))
        rng.shuffle(neg)
        train.append({"query": query, "qid": str(30000 + k), "pos": [tools[i]["text"] for i in pos],
                      "neg": [tools[i]["text"] for i in neg], "task": "tool"})
    test = []
    for k in range(40):
        query, pos = unique_request("test")
        test.append({"query": query, "query_id": 7000 + k, "pos_index": pos, "task": "tool"})
    return {"tool/train.json": train, "tool/test.json": test,
            "tool/corpus.json": [{"text": t["text"]} for t in tools]}


# ---------------------------------------------------------------------------------------------------------------------
# icl: demonstrations of small NLP tasks
# ---------------------------------------------------------------------------------------------------------------------

REVIEW_ITEMS = {"food": ["the pasta", "the soup", "the breakfast buffet", "the dessert menu"],
                "tech": ["this phone", "the laptop battery", "this pair of headphones", "the smart speaker"],
                "travel": ["the hotel room", "the hiking tour", "the ferry crossing", "the museum visit"],
                "service": ["the delivery", "the customer service", "the repair shop", "the booking process"]}
REVIEW_POS = ["was absolutely wonderful", "exceeded every expectation", "made my whole week", "was worth every penny",
              "was better than I hoped"]
REVIEW_NEG = ["was a complete letdown", "fell apart after two days", "was cold and overpriced",
              "left me disappointed", "was a waste of money"]
REVIEW_TAIL = ["", " I would go back.", " Honestly, I did not expect that.", " My friends agreed.",
               " I told everyone about it."]
HEADLINES = {
    "sports": ["{W} Rovers beat {V} United 3-1 in the cup final", "Sprinter from {W} breaks national record",
               "{W} cycling team wins mountain stage", "Goalkeeper signs four-year deal with {W} City"],
    "business": ["{W} Foods shares rise after record quarter", "Start-up {W} raises funds for delivery robots",
                 "Bank of {W} cuts interest rates", "{W} Motors to open factory near {V}"],
    "science": ["Researchers find new species of frog near {W}", "Telescope at {W} spots distant comet",
                "Study links sleep and memory in {W} volunteers", "Engineers at {W} test ocean wave generator"],
    "politics": ["Council of {W} votes on new parking rules", "{W} minister resigns after budget row",
                 "Voters in {W} head to the polls on Sunday", "{W} and {V} sign border agreement"],
}
PARA_TEMPLATES = [("{P} moved from {A} to {B} in {Y}.", "In {Y}, {P} relocated from {A} to {B}.",
                   "In {Y}, {P} relocated from {B} to {A}."),
                  ("{P} studied in {A} before teaching in {B}.", "Before teaching in {B}, {P} was a student in {A}.",
                   "Before teaching in {A}, {P} was a student in {B}."),
                  ("The bridge between {A} and {B} opened in {Y}.", "In {Y}, a bridge linking {A} and {B} was opened.",
                   "In {Y}, a bridge linking {A} and {B} was closed."),
                  ("{P} was born in {A} and died in {B}.", "Born in {A}, {P} later died in {B}.",
                   "Born in {B}, {P} later died in {A}.")]
NLI_TEMPLATES = [("{P} bought three {X} at the market.", "{P} bought some {X}.", "{P} bought nothing at the market.",
                  "{P} bought the {X} for a cake."),
                 ("{P} ran to the station in the rain.", "{P} went to the station.", "{P} stayed at home all day.",
                  "{P} missed the train."),
                 ("{P} painted the fence green on Saturday.", "The fence was painted.", "{P} never touched the fence.",
                  "{P} enjoyed painting the fence."),
                 ("{P} read a book about {X} on the ferry.", "{P} was on a ferry.", "{P} has never been on a ferry.",
                  "{P} bought the book at the harbour.")]
FRUITS = ["apples", "pears", "plums", "lemons", "figs", "oranges", "cherries", "peaches"]
ANTONYMS = [("hot", "cold"), ("early", "late"), ("generous", "stingy"), ("ancient", "modern"), ("shallow", "deep"),
            ("fragile", "sturdy"), ("noisy", "quiet"), ("rough", "smooth"), ("wide", "narrow"), ("brave", "cowardly"),
            ("tidy", "messy"), ("rare", "common"), ("heavy", "light"), ("polite", "rude"), ("empty", "full"),
            ("sharp", "blunt"), ("dry", "wet"), ("simple", "complex"), ("cheap", "expensive"), ("first", "last")]
COUNT_THINGS = ["marbles", "stickers", "apples", "pencils", "stamps", "shells", "coins", "buttons"]


def _icl_examples(rng: random.Random, names: Names) -> list[Record]:
    """Input/output examples; `group` marks examples that are close to each other within a task."""
    ex: list[Record] = []
    places = [names.word() for _ in range(30)]
    for _ in range(45):
        group = rng.choice(list(REVIEW_ITEMS))
        good = rng.random() < 0.5
        text = (f"Review: {rng.choice(REVIEW_ITEMS[group]).capitalize()} "
                f"{rng.choice(REVIEW_POS if good else REVIEW_NEG)}.{rng.choice(REVIEW_TAIL)}")
        ex.append(dict(task="sentiment", group=group, input=f"{text}\nIs this review positive or negative?",
                       output="positive" if good else "negative"))
    for _ in range(45):
        t_i = rng.randrange(len(PARA_TEMPLATES))
        s1, yes, no = PARA_TEMPLATES[t_i]
        same = rng.random() < 0.5
        a, b = rng.sample(places, 2)
        slots = dict(P=names.person()[0], A=a, B=b, Y=rng.randint(1900, 2020))
        ex.append(dict(task="paraphrase", group=str(t_i),
                       input=f"{s1.format(**slots)} {(yes if same else no).format(**slots)} "
                             f"Do these sentences mean the same thing?", output="Yes" if same else "No"))
    for _ in range(45):
        topic = rng.choice(list(HEADLINES))
        w, v = rng.sample(places, 2)
        h = rng.choice(HEADLINES[topic]).format(W=w, V=v)
        ex.append(dict(task="topic", group=topic, input=f"Headline: {h}\nWhich topic is this: sports, business, "
                       f"science or politics?", output=topic))
    for _ in range(45):
        t_i = rng.randrange(len(NLI_TEMPLATES))
        prem, ent, con, neu = NLI_TEMPLATES[t_i]
        label, hyp = rng.choice([("yes", ent), ("no", con), ("maybe", neu)])
        slots = dict(P=names.person()[0].split()[0], X=rng.choice(FRUITS))
        ex.append(dict(task="nli", group=str(t_i), input=f"Premise: {prem.format(**slots)} Hypothesis: "
                       f"{hyp.format(**slots)} Does the premise entail the hypothesis? yes, no or maybe?",
                       output=label))
    for k in range(40):
        w, a = ANTONYMS[k % len(ANTONYMS)]
        if k >= len(ANTONYMS):
            w, a = a, w
        ex.append(dict(task="antonym", group=str(k % 4), input=f"Give the opposite of the word '{w}'.", output=a))
    for _ in range(45):
        thing = rng.choice(COUNT_THINGS)
        a = rng.randint(8, 60)
        b = rng.randint(1, a - 1)
        give = rng.random() < 0.5
        who = names.person()[0].split()[0]
        q = (f"{who} had {a} {thing} and gave away {b}. How many {thing} are left?" if give else
             f"{who} had {a} {thing} and found {b} more. How many {thing} are there now?")
        ex.append(dict(task="arithmetic", group="minus" if give else "plus", input=q, output=str(a - b if give else a + b)))
    return ex


def build_icl() -> dict[str, list[Record]]:
    rng = _rng("icl")
    names = Names(rng)
    ex = _icl_examples(rng, names)
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(ex):
        by_task.setdefault(e["task"], []).append(i)
    tasks = list(by_task)
    demo = [f"{e['input']}\n{e['output']}" for e in ex]
    out = []
    for k in range(90):
        task = tasks[k % len(tasks)]
        qi = rng.choice(by_task[task])
        q = ex[qi]
        close = [i for i in by_task[task] if i != qi and ex[i]["group"] == q["group"]]
        far = [i for i in by_task[task] if i != qi and ex[i]["group"] != q["group"]]
        other = [i for t in tasks if t != task for i in by_task[t]]
        pos = rng.sample(close, 3)
        neg_same = rng.sample([i for i in close if i not in pos] + far, 7)
        neg_other = rng.sample(other, 5)
        pos_s = sorted((rng.uniform(-7.2, -5.0) for _ in pos), reverse=True)
        ceiling = pos_s[-1] - 0.05
        neg = [(min(rng.gauss(-8.0 if ex[i]["group"] != q["group"] else -7.6, 0.5), ceiling), i) for i in neg_same]
        neg += [(min(rng.gauss(-9.6, 0.6), ceiling), i) for i in neg_other]
        neg.sort(key=lambda t: -t[0])
        out.append({"query": q["input"], "pos": [demo[i] for i in pos], "neg": [demo[i] for _, i in neg],
                    "teacher_scores": [_r(s) for s in pos_s] + [_r(s) for s, _ in neg], "task": "icl"})
    return {"icl/train.json": out}


# ---------------------------------------------------------------------------------------------------------------------
# chat: multi-session dialogue memory
# ---------------------------------------------------------------------------------------------------------------------

CHAT_TOPICS = [
    dict(s1="Do you have any pets?", s2="Yes, a {breed} called {pet}. {Pron} is {age} and still chews everything.",
         q=["Has {pet} stopped chewing things yet?", "How is your {breed} doing these days?",
            "Did you ever train your dog to stop eating shoes?"],
         a="{pet} is doing great, although {pron} ate one of my slippers last week.",
         slots=dict(breed=["beagle", "collie", "spaniel", "terrier", "greyhound"],
                    pet=["Biscuit", "Pepper", "Juniper", "Mochi", "Bramble", "Waffle"], age=["two", "three", "five"])),
    dict(s1="What do you do for work?", s2="I'm a {job} at a {workplace}. The hours are long but I like it.",
         q=["Was it busy at the {workplace} this week?", "How are things going at your job?",
            "Are you still working those long hours?"],
         a="It was hectic, we were short of staff at the {workplace} again.",
         slots={"job+workplace": ["nurse+hospital", "baker+bakery", "mechanic+garage", "librarian+library",
                                  "lab technician+research lab"]}),
    dict(s1="What do you like to do on weekends?", s2="I spend most weekends {hobby}. It clears my head.",
         q=["Did you get any {hobby} done last weekend?", "How is your weekend hobby going?",
            "Is {hobby} still your favourite way to relax?"],
         a="Pretty well, I managed a few hours of {hobby} on Sunday morning.",
         slots=dict(hobby=["rock climbing", "birdwatching", "sea kayaking", "pottery", "restoring old radios"])),
    dict(s1="Any travel plans this year?", s2="I'm saving up for a trip to {country}. I want to see the {sight}.",
         q=["Have you booked your trip to {country} yet?", "Did you manage to save enough for your holiday?",
            "When are you going to see the {sight}?"],
         a="Not yet, but I found cheap flights to {country} for the autumn.",
         slots=dict(country=["Iceland", "Japan", "Peru", "Morocco", "New Zealand"],
                    sight=["glaciers", "temples", "mountains", "old markets", "fjords"])),
    dict(s1="What's your favourite food?", s2="I love {dish}. I cook it every Sunday for my family.",
         q=["Did you make {dish} again this Sunday?", "What did you cook for the family this week?",
            "Have you changed your Sunday recipe at all?"],
         a="I made a big pot of {dish} again and there was nothing left.",
         slots=dict(dish=["lentil curry", "mushroom risotto", "fish stew", "dumplings", "lasagne"])),
    dict(s1="Do you play any music?", s2="I play the {instrument} in a small band. We do pub gigs sometimes.",
         q=["How did your band's last gig go?", "Are you still practising the {instrument}?",
            "Do you have any shows coming up with the band?"],
         a="The last gig was fun, the pub was packed and I only missed one note on the {instrument}.",
         slots=dict(instrument=["bass guitar", "drums", "fiddle", "trumpet", "keyboard"])),
    dict(s1="Tell me about your family.", s2="My {relative} just moved to {city} to start university.",
         q=["Has your {relative} settled in at university?", "How is your {relative} finding {city}?",
            "Do you miss having your {relative} around?"],
         a="My {relative} loves {city}, though the rent there is shocking.",
         slots=dict(relative=["sister", "brother", "cousin", "daughter", "son"],
                    city=["Edinburgh", "Lisbon", "Toronto", "Melbourne", "Vienna"])),
    dict(s1="Do you do any sport?", s2="I run with a club every {day} morning, rain or shine.",
         q=["Are you still running on {day}s?", "How is the running club going?",
            "Did you go out with the club even in this weather?"],
         a="Still going, we did eight kilometres on {day} even though it poured.",
         slots=dict(day=["Tuesday", "Thursday", "Saturday", "Sunday", "Monday"])),
    dict(s1="Are you into gardening?", s2="A little. I'm growing {veg} on my balcony this year.",
         q=["How are the {veg} coming along?", "Has your balcony garden produced anything yet?",
            "Did the cold weather hurt your plants?"],
         a="The {veg} are finally ripening, I picked the first ones yesterday.",
         slots=dict(veg=["tomatoes", "chillies", "strawberries", "peas", "beans"])),
    dict(s1="Read anything good lately?", s2="I'm halfway through a novel about {subject}. It's slow but lovely.",
         q=["Did you finish that novel about {subject}?", "How was the ending of the book you were reading?",
            "Would you recommend the book you were halfway through?"],
         a="I finished it last night, the ending about {subject} made me cry.",
         slots=dict(subject=["a lighthouse keeper", "two rival chefs", "a lost expedition", "a village choir"])),
]
SMALL_TALK = ["Speaker 1: How was your day?\nSpeaker 2: Long, but fine. The weather was nice at least.",
              "Speaker 1: Sorry I'm late to reply.\nSpeaker 2: No worries, I was busy anyway.",
              "Speaker 1: Did you see the storm last night?\nSpeaker 2: Yes, the thunder kept me awake for hours.",
              "Speaker 1: I just made a cup of tea.\nSpeaker 2: Good idea, I think I'll make one too.",
              "Speaker 1: Happy Friday!\nSpeaker 2: Finally. This week felt like a month."]


def build_chat() -> dict[str, list[Record]]:
    rng = _rng("chat")
    out = []
    for k in range(80):
        n_turns = rng.randint(6, 10)
        n_small = rng.randint(1, 2)
        topics = rng.sample(CHAT_TOPICS, n_turns - n_small)
        filled = []
        for t in topics:
            slots = {}
            for key, vals in t["slots"].items():  # "a+b" keys pick matching values together
                slots.update(zip(key.split("+"), rng.choice(vals).split("+")))
            he = rng.random() < 0.5
            slots.update(pron="he" if he else "she", Pron="He" if he else "She")
            filled.append((t, slots))
        turns = [(f"Speaker 1: {t['s1']}\nSpeaker 2: {t['s2'].format(**s)}", i) for i, (t, s) in enumerate(filled)]
        turns += [(x, -1) for x in rng.sample(SMALL_TALK, n_small)]
        rng.shuffle(turns)
        target = rng.randrange(len(filled))
        t, s = filled[target]
        scores = []
        for _, i in turns:
            scores.append(rng.gauss(-2.05, 0.12) if i == target else rng.gauss(-3.0, 0.12))
        top = max(sc for sc, (_, i) in zip(scores, turns) if i != target)
        scores = [max(sc, top + 0.15) if i == target else sc for sc, (_, i) in zip(scores, turns)]
        out.append({"history": [x for x, _ in turns], "query": rng.choice(t["q"]).format(**s), "query_id": k,
                    "answers": [t["a"].format(**s)], "task": "chat",
                    "teacher_scores": [_r(min(sc, -0.5)) for sc in scores]})
    return {"chat/train.json": out}


# ---------------------------------------------------------------------------------------------------------------------
# lrlm: chunks of long chronicles; earlier chunks about the same thread help predict the next chunk
# ---------------------------------------------------------------------------------------------------------------------

THREAD_PLACES = ["the {W} lighthouse", "the bakery on {W} Street", "the {W} boatyard", "the school on {W} Hill",
                 "the {W} orchard", "the town archive in {W}", "the ferry landing at {W}", "the {W} chapel"]
THREAD_OBJECTS = ["a brass telescope", "the unfinished mural", "a crate of seed potatoes", "the broken church clock",
                  "a bundle of old letters", "the new ferry engine", "a borrowed violin", "the flood map",
                  "a jar of wild honey", "the mayor's ledger"]
SENTENCES = [
    "{C} walked down to {place} again, carrying {obj}.",
    "Nobody at {place} had expected {C} to come back so soon.",
    "By evening {C} had decided that {obj} belonged at {place} after all.",
    "The talk at {place} that week was all about {obj}.",
    "{C} wrote in the diary that {obj} was giving more trouble than anyone admitted.",
    "Rain kept {C} indoors at {place} for most of the afternoon.",
    "{C} asked {other} for help with {obj}, but got only a shrug.",
    "Children gathered outside {place} to watch {C} at work.",
    "It was the third time that month {C} had mentioned {obj}.",
    "A letter arrived at {place} addressed to {C}, though nobody knew who sent it.",
    "{C} polished {obj} until it shone and then set it by the window at {place}.",
    "Old neighbours said {place} had never been busier than in those days of {C}.",
    "{C} counted the days until {obj} could finally be moved away from {place}.",
    "When the wind dropped, {C} opened the doors of {place} and let the light in.",
    "{other} claimed that {obj} had once belonged to the family of {C}.",
    "{C} laughed for the first time in weeks, standing by {place} with {obj}.",
]


def _chronicle(rng: random.Random, names: Names) -> tuple[list[str], list[set[int]]]:
    threads = []
    for _ in range(6):
        threads.append(dict(C=names.person()[0], place=rng.choice(THREAD_PLACES).format(W=names.word()),
                            obj=rng.choice(THREAD_OBJECTS)))
    paras = []
    for _ in range(34):
        t = rng.randrange(len(threads))
        th = threads[t]
        other = threads[rng.choice([i for i in range(len(threads)) if i != t])]["C"]
        sents = [s.format(C=th["C"], place=th["place"], obj=th["obj"], other=other)
                 for s in rng.sample(SENTENCES, rng.randint(3, 5))]
        paras.append(" ".join(sents))
    text = "\n\n".join(paras)
    words = text.split(" ")
    chunks, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > 330:
            chunks.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        chunks.append(cur)
    keys = [[th["C"].split()[1], th["place"].split()[-1] if th["place"].split()[-1][0].isupper() else
             th["place"].split()[1]] for th in threads]
    present = [{t for t, ks in enumerate(keys) if any(k in c for k in ks)} for c in chunks]
    return chunks, present


def build_lrlm() -> dict[str, list[Record]]:
    rng = _rng("lrlm")
    names = Names(rng)
    out = []
    qid = 40000
    while len(out) < 64:
        chunks, present = _chronicle(rng, names)
        starts = list(range(16, len(chunks) - 1))
        for i in rng.sample(starts, min(len(starts), 16)):
            if len(out) == 64:
                break
            n_neg = rng.randint(16, min(24, i))
            neg_ids = list(range(i - n_neg, i))
            target = present[i + 1]
            scores = []
            for j in neg_ids:
                overlap = len(present[j] & target) / max(1, len(target))
                recency = (j - (i - n_neg)) / n_neg
                scores.append(-2.75 + 0.75 * overlap + 0.12 * recency + rng.gauss(0, 0.04))
            scores = [min(-1.8, max(-2.9, s)) for s in scores]
            if max(scores) - min(scores) < 0.1:
                continue
            out.append({"query_id": qid, "query": chunks[i], "answers": [chunks[i + 1]], "pos": [],
                        "neg": [chunks[j] for j in neg_ids], "context": "", "task": "lrlm",
                        "teacher_scores": [_r(s) for s in scores]})
            qid += 1
    return {"lrlm/train.json": out}


# ---------------------------------------------------------------------------------------------------------------------

def build_all() -> dict[str, list[Record]]:
    files: dict[str, list[Record]] = {}
    for part in (build_qa, build_tool, build_convsearch, build_icl, build_chat, build_lrlm):
        files.update(part())
    return files


def build(out_dir: str = HERE) -> dict[str, int]:
    """Write every sample file under out_dir; return {relative path: number of records}."""
    counts = {}
    for rel, records in build_all().items():
        counts[rel] = write_jsonl_atomic(os.path.join(out_dir, rel), records)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Regenerate the sample data shipped with embedder.")
    ap.add_argument("--out", default=HERE, help="output folder (default: the package's sample_data folder)")
    args = ap.parse_args(argv)
    for rel, n in build(args.out).items():
        print(f"{n:5d}  {os.path.join(args.out, rel)}")


if __name__ == "__main__":
    main()
