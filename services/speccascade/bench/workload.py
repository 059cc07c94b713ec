"""The fixed prompt sets: held-out chat and code prompts (speed), and the frontier's quality tasks in
two families with external ground truth:

- "code": held-out stdlib line completion (models.evaluate.line_completion_tasks): exact match and
  edit similarity of the next line;
- "facts": short questions through the chat template whose answers are known (capitals, antonyms,
  irregular plurals), scored by models.evaluate.answer_correct. SmolLM2-135M-Instruct answers most
  of them in its first line; a draft a tenth its size rarely does. The countries of
  models.corpus.COUNTRIES are left out: the draft was distilled on the target's answers to
  "What is the capital of {country}?" for them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from speccascade.models.evaluate import LineTask, line_completion_tasks


def throughput_prompts(tokenizer, n: int, prompt_tokens: int = 192) -> list[list[int]]:
    """n held-out prompts, chat (through the chat template) and raw code alternating: the ones
    the default pair's card measures acceptance on (models.evaluate.held_out_prompts), never
    seen in the draft's distillation; each cut to its last prompt_tokens tokens."""
    from speccascade.models.evaluate import held_out_prompts

    chat, code = (held_out_prompts(tokenizer, kind, n, prompt_tokens) for kind in ("chat", "code"))
    mixed = [p for pair in zip(chat, code) for p in pair] + chat[len(code):] + code[len(chat):]
    return mixed[:n]


def quality_tasks(tokenizer, n: int) -> list[LineTask]:
    return line_completion_tasks(tokenizer, n, seed=1)


# --------------------------------------------------------------------------------------------
# The frontier's tasks: both families, interleaved.
# --------------------------------------------------------------------------------------------

FAMILIES = ("code", "facts")


@dataclass(frozen=True)
class Task:
    family: str                 # "code" or "facts"
    prompt: str                 # the text sent (facts: the question through the chat template)
    answers: tuple[str, ...]    # code: the next line; facts: every accepted answer
    kind: str = ""              # facts: capital, antonym or plural


def frontier_tasks(tokenizer, per_family: int, families: tuple[str, ...] = FAMILIES) -> list[Task]:
    """per_family tasks of each family, interleaved (code, facts, code, …): any prefix of the list
    is balanced, so the speed subset, the service check and the sequential cascade's tasks are."""
    made = {}
    if "code" in families:
        made["code"] = [Task("code", t.prompt, (t.answer,))
                        for t in line_completion_tasks(tokenizer, per_family, seed=1)]
    if "facts" in families:
        made["facts"] = fact_tasks(tokenizer, per_family)
    unknown = set(families) - set(made)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; known: {FAMILIES}")
    return [t for group in zip(*(made[f] for f in families)) for t in group]


def _pairs(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """"key=answer|alternative; …" → [(key, (answer, alternative)), …]."""
    out = []
    for item in text.replace("\n", " ").split(";"):
        if item.strip():
            key, answers = item.split("=")
            out.append((key.strip(), tuple(a.strip() for a in answers.split("|"))))
    return out


# Capitals whose name differs from the country's (a reply repeating the question never scores),
# with one accepted spelling per line of usage; no country of models.corpus.COUNTRIES.
CAPITALS = _pairs("""Russia=Moscow; the United Kingdom=London; England=London; Scotland=Edinburgh;
Wales=Cardiff; Austria=Vienna; Switzerland=Bern|Berne; Belgium=Brussels; Denmark=Copenhagen;
Hungary=Budapest; the Czech Republic=Prague; Slovakia=Bratislava; Romania=Bucharest;
Bulgaria=Sofia; Serbia=Belgrade; Croatia=Zagreb; Slovenia=Ljubljana; Ukraine=Kyiv|Kiev;
Belarus=Minsk; Lithuania=Vilnius; Latvia=Riga; Estonia=Tallinn; Albania=Tirana; Cyprus=Nicosia;
Malta=Valletta; Cuba=Havana; Jamaica=Kingston; Haiti=Port-au-Prince;
the Dominican Republic=Santo Domingo; Colombia=Bogota|Bogotá; Venezuela=Caracas; Ecuador=Quito;
Bolivia=La Paz|Sucre; Paraguay=Asuncion|Asunción; Uruguay=Montevideo;
the United States=Washington; Honduras=Tegucigalpa; Nicaragua=Managua;
Costa Rica=San Jose|San José; South Korea=Seoul; North Korea=Pyongyang;
Mongolia=Ulaanbaatar|Ulan Bator; Indonesia=Jakarta; the Philippines=Manila;
Malaysia=Kuala Lumpur; Cambodia=Phnom Penh; Laos=Vientiane; Bangladesh=Dhaka;
Pakistan=Islamabad; Afghanistan=Kabul; Nepal=Kathmandu; Iran=Tehran; Iraq=Baghdad;
Syria=Damascus; Lebanon=Beirut; Jordan=Amman; Saudi Arabia=Riyadh; Yemen=Sanaa|Sana'a;
Oman=Muscat; Qatar=Doha; the United Arab Emirates=Abu Dhabi; Kazakhstan=Astana|Nur-Sultan;
Uzbekistan=Tashkent; Georgia=Tbilisi; Armenia=Yerevan; Azerbaijan=Baku;
Ethiopia=Addis Ababa; Ghana=Accra; Senegal=Dakar; Uganda=Kampala; Rwanda=Kigali;
Zimbabwe=Harare; Zambia=Lusaka; Angola=Luanda; Algeria=Algiers; Tunisia=Tunis; Libya=Tripoli;
Sudan=Khartoum; Somalia=Mogadishu; Madagascar=Antananarivo; Mozambique=Maputo;
Namibia=Windhoek; Botswana=Gaborone; South Africa=Pretoria|Cape Town|Bloemfontein;
Cameroon=Yaounde|Yaoundé; Mali=Bamako; Niger=Niamey; New Zealand=Wellington; Fiji=Suva;
Papua New Guinea=Port Moresby; Taiwan=Taipei; Sri Lanka=Colombo|Sri Jayawardenepura Kotte""")

ANTONYMS = _pairs("""hot=cold; big=small|little; up=down; fast=slow; happy=sad|unhappy;
light=dark|heavy; old=new|young; open=closed|shut; day=night; wet=dry; hard=soft|easy;
tall=short; rich=poor; strong=weak; early=late; full=empty; high=low; thick=thin;
clean=dirty; cheap=expensive; loud=quiet|soft; near=far; inside=outside; true=false;
good=bad|evil; win=lose; love=hate; push=pull; buy=sell; laugh=cry; alive=dead;
awake=asleep; above=below; before=after; always=never; first=last; north=south; east=west;
top=bottom; sweet=sour|bitter; smooth=rough; sharp=dull|blunt; friend=enemy|foe;
question=answer; arrive=depart|leave; accept=reject|refuse; increase=decrease;
maximum=minimum; positive=negative; entrance=exit; victory=defeat; success=failure;
summer=winter; black=white; boy=girl; king=queen; man=woman; narrow=wide|broad;
deep=shallow; beautiful=ugly; safe=dangerous|unsafe; easy=difficult|hard; polite=rude|impolite;
noisy=quiet|silent; heavy=light; young=old; wide=narrow; long=short;
brave=cowardly|afraid|scared; begin=end|finish; remember=forget; include=exclude;
import=export; ancient=modern; sunrise=sunset; city=country|countryside|village;
future=past; borrow=lend; teacher=student|pupil; give=take|receive; visible=invisible""")

PLURALS = _pairs("""mouse=mice; child=children; foot=feet; tooth=teeth; man=men; woman=women;
goose=geese; person=people; ox=oxen; leaf=leaves; knife=knives; wife=wives; life=lives;
wolf=wolves; half=halves; shelf=shelves; loaf=loaves; calf=calves; thief=thieves;
cactus=cacti|cactuses; fungus=fungi|funguses; nucleus=nuclei; radius=radii; crisis=crises;
analysis=analyses; thesis=theses; phenomenon=phenomena; criterion=criteria;
medium=media|mediums; baby=babies; city=cities; party=parties; story=stories;
potato=potatoes; tomato=tomatoes; hero=heroes; box=boxes; bus=buses|busses; church=churches;
dish=dishes; fox=foxes; glass=glasses; watch=watches; dress=dresses""")

FACT_TEMPLATES = {
    "capital": (CAPITALS, ("What is the capital of {x}?", "What is the capital city of {x}?")),
    "antonym": (ANTONYMS, ('What is the opposite of "{x}"?', 'What is the antonym of "{x}"?')),
    "plural": (PLURALS, ('What is the plural of "{x}"?', 'What is the plural form of "{x}"?')),
}


def fact_questions() -> list[tuple[str, str, tuple[str, ...]]]:
    """Every (kind, question, accepted answers), deduplicated, in a fixed order."""
    out = {}
    for kind, (pairs, templates) in FACT_TEMPLATES.items():
        for template in templates:
            for x, answers in pairs:
                out.setdefault(template.format(x=x), (kind, answers))
    return [(kind, q, answers) for q, (kind, answers) in out.items()]


def fact_tasks(tokenizer, n: int, seed: int = 1) -> list[Task]:
    """n deterministic question tasks, the three kinds mixed; each question put through the
    tokenizer's chat template (as text: encoding it gives the template's token ids)."""
    questions = fact_questions()
    if n > len(questions):
        raise ValueError(f"only {len(questions)} fact questions exist, asked for {n}")
    if not tokenizer.chat_template:
        raise ValueError("the facts family needs a tokenizer with a chat template")
    chosen = random.Random(seed).sample(questions, n)
    return [Task("facts", tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                        add_generation_prompt=True, tokenize=False),
                 answers, kind) for kind, q, answers in chosen]
