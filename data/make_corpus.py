#!/usr/bin/env python3
"""Generate the bundled mini speech corpus for w2vcache (synthetic, LibriSpeech layout).

What it makes
-------------
About eight and a half minutes of synthetic English speech, laid out exactly like
LibriSpeech::

    data/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<nnnn>.flac
    data/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

with the six splits ``train-clean``, ``train-other``, ``dev-clean``, ``dev-other``,
``test-clean`` and ``test-other``.  Each ``.trans.txt`` line is
``<speaker>-<chapter>-<nnnn> TRANSCRIPT`` where the transcript is the spoken sentence
upper-cased with punctuation removed (letters A-Z, apostrophe and single spaces).

Audio is 16 kHz, mono, 16-bit FLAC, synthesized with espeak-ng and post-processed with
sox (resampling, trimming of leading/trailing silence, level normalisation).  Every
speaker is one fixed espeak-ng voice + variant + pitch + rate combination.  Speakers
of the train, dev and test portions are disjoint.  The ``-other`` splits are harder:
rarer accents/variants, faster speech, additive noise at a moderate SNR and, for some
speakers, a telephone-band filter.  Every utterance uses a different sentence.

The speech is machine generated; no third-party recordings are involved.  It is meant
for smoke tests and demos (e.g. of feature extraction / probing pipelines with random
or small models), not for benchmarking.

Requirements
------------
Python 3.11 standard library plus the command line tools ``espeak-ng`` and ``sox``
(with FLAC support)::

    apt-get install -y espeak-ng sox libsox-fmt-all

How to regenerate
-----------------
From the repository root::

    python data/make_corpus.py            # default seed 1234, writes into data/

The script deletes the six split directories under data/ and rebuilds them.  Random
choices use ``random.Random(seed)`` and sox runs with ``-R`` (repeatable noise), so the
output is deterministic for a given seed and the same espeak-ng/sox versions.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SAMPLE_RATE = 16000
MIN_SECONDS = 1.0
MAX_SECONDS = 8.0
SPLITS = ("train-clean", "train-other", "dev-clean", "dev-other", "test-clean", "test-other")

# Target amount of audio per split, in seconds (about 60% train, 15% dev, 25% test).
# Utterances are added round-robin over the split's speakers until the target is met.
SPLIT_TARGET_SECONDS = {
    "train-clean": 170.0,
    "train-other": 135.0,
    "dev-clean": 40.0,
    "dev-other": 37.0,
    "test-clean": 68.0,
    "test-other": 62.0,
}


@dataclass(frozen=True)
class Speaker:
    speaker_id: int
    split: str
    voice: str  # espeak-ng voice name
    variant: str  # espeak-ng variant file name ("" for the voice's default)
    pitch: int  # espeak-ng -p (0..99)
    rate: int  # espeak-ng -s (words per minute)
    noise: str = ""  # sox synth noise type ("" = clean)
    snr_db: tuple[float, float] = (0.0, 0.0)  # SNR range for the noise, drawn per utterance
    telephone: bool = False  # band-limit to 300-3400 Hz

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice


# One line per speaker: voice+variant+pitch+rate is fixed per speaker.
SPEAKERS = [
    # train-clean: common accents, moderate rate, no noise
    Speaker(101, "train-clean", "en-us", "", 48, 165),
    Speaker(102, "train-clean", "en-gb", "f3", 62, 160),
    Speaker(103, "train-clean", "en-gb-x-rp", "m3", 40, 170),
    Speaker(104, "train-clean", "en-us", "f2", 56, 155),
    # train-other: rarer accents, faster, noisy
    Speaker(105, "train-other", "en-gb-scotland", "m1", 35, 195, "pinknoise", (8.0, 14.0)),
    Speaker(106, "train-other", "en-029", "f4", 66, 205, "whitenoise", (10.0, 16.0)),
    Speaker(107, "train-other", "en-gb-x-gbclan", "klatt4", 45, 200, "brownnoise", (6.0, 12.0), True),
    # dev-clean
    Speaker(108, "dev-clean", "en-gb-x-gbcwmd", "m2", 44, 165),
    Speaker(109, "dev-clean", "en-us", "f5", 60, 160),
    # dev-other
    Speaker(110, "dev-other", "en-us-nyc", "Storm", 38, 205, "pinknoise", (8.0, 14.0)),
    Speaker(111, "dev-other", "en-gb-scotland", "f1", 64, 200, "whitenoise", (10.0, 15.0), True),
    # test-clean
    Speaker(112, "test-clean", "en-gb", "m7", 42, 165),
    Speaker(113, "test-clean", "en-us", "Alicia", 58, 160),
    Speaker(114, "test-clean", "en-gb-x-rp", "f2", 54, 170),
    # test-other
    Speaker(115, "test-other", "en-029", "m4", 36, 210, "pinknoise", (7.0, 13.0)),
    Speaker(116, "test-other", "en-gb-x-gbcwmd", "Annie", 62, 200, "whitenoise", (9.0, 15.0)),
    Speaker(117, "test-other", "en-us-nyc", "klatt2", 46, 205, "brownnoise", (6.0, 12.0), True),
]

SENTENCES = [
    # weather and seasons
    "The morning fog lifted slowly over the quiet harbor.",
    "Heavy rain is expected along the coast later this afternoon.",
    "It's unusually warm for the first week of November.",
    "A cold wind swept across the empty fields all night.",
    "The children built a snowman beside the old garden wall.",
    "Thunder rolled through the valley long after the storm had passed.",
    "We watched the clouds turn pink as the sun went down.",
    "The forecast says the frost will be gone by midday.",
    "Spring arrived early and the cherry trees bloomed in March.",
    "Don't forget your umbrella because the sky looks rather grey.",
    "The river froze solid during the coldest winter anyone remembered.",
    "A gentle breeze carried the smell of cut grass into the kitchen.",
    "Dry summers have made the hillside forests more likely to burn.",
    "The weather station on the mountain records the wind every hour.",
    "By evening the puddles had frozen into thin sheets of ice.",
    # travel
    "The train to the coast leaves from the second platform.",
    "She packed a small bag and caught the early bus to town.",
    "Our flight was delayed because of strong winds at the airport.",
    "The ferry crossing took longer than we had planned.",
    "He rented a bicycle and rode along the canal for hours.",
    "We stopped at a little cafe near the border for lunch.",
    "The map was old but the mountain roads had not changed.",
    "They spent the night in a cabin at the edge of the lake.",
    "Please keep your ticket until you leave the station.",
    "The road through the desert was straight and almost empty.",
    "I've always wanted to see the northern lights in winter.",
    "The guide pointed out an eagle circling above the cliffs.",
    "Our hotel room looked out over a busy market square.",
    "The taxi driver knew a shortcut through the narrow streets.",
    "After a long walk we finally reached the top of the pass.",
    # science and nature
    "Light from the sun takes about eight minutes to reach the earth.",
    "Bees communicate the location of flowers with a special dance.",
    "The telescope revealed faint rings around the distant planet.",
    "Water expands when it freezes, which is why pipes can burst.",
    "Most of the oxygen we breathe is produced by tiny ocean plants.",
    "The chemist measured the temperature of the solution very carefully.",
    "Sound travels faster through water than it does through air.",
    "Volcanic ash can stay in the atmosphere for many months.",
    "A healthy forest stores a huge amount of carbon in its soil.",
    "The researchers tracked the migrating whales with small radio tags.",
    "Salt water boils at a slightly higher temperature than fresh water.",
    "Some desert plants can survive for years without any rain.",
    "The microscope showed thousands of cells dividing on the glass slide.",
    "Magnets have two poles that attract or repel each other.",
    "Owls can turn their heads much further than most other birds.",
    "The moon's gravity pulls on the oceans and causes the tides.",
    "Earthquakes happen when large plates of rock suddenly slip.",
    "The young scientist repeated the experiment to check her results.",
    "Coral reefs are home to an astonishing variety of fish.",
    "A rainbow appears when sunlight is bent by drops of water.",
    # cooking and food
    "Add a pinch of salt before you stir the soup again.",
    "The bread smelled wonderful when it came out of the oven.",
    "She chopped the onions finely and fried them in butter.",
    "Let the dough rest for an hour in a warm place.",
    "My grandmother's apple pie was famous in the whole village.",
    "Fresh herbs make a simple tomato sauce taste much better.",
    "He burned the rice because he forgot to turn down the heat.",
    "The market sells fish that was caught only this morning.",
    "Whisk the eggs and sugar together until the mixture is pale.",
    "We ate warm noodles at a tiny stall near the station.",
    "Don't open the oven door while the cake is still rising.",
    "The recipe calls for two cups of flour and a little honey.",
    "Roasted vegetables go well with almost any kind of meat.",
    "The coffee was strong and bitter but it woke me up.",
    "They grow their own beans and potatoes behind the house.",
    # history
    "The castle was built to guard the only bridge across the river.",
    "Ancient sailors navigated by watching the positions of the stars.",
    "The printing press changed the way ideas spread across Europe.",
    "The old city walls were torn down to make room for a road.",
    "Roman engineers built aqueducts that carried water for many miles.",
    "The museum keeps letters written by soldiers during the war.",
    "Early farmers learned to store grain through the long winters.",
    "The treaty was signed in a small room above the town hall.",
    "Merchants carried silk and spices along the ancient trade routes.",
    "The first public library in the town opened a century ago.",
    "Historians still argue about why the empire finally collapsed.",
    "The lighthouse kept ships away from the rocks for generations.",
    "Steam engines made it possible to build factories far from rivers.",
    "The explorers reached the pole after months of hard travel.",
    "Old maps often showed sea monsters in the unknown waters.",
    # daily life
    "I usually walk the dog before breakfast on weekdays.",
    "The kettle whistled while he searched for a clean cup.",
    "Could you please turn the music down a little?",
    "She left her keys on the table next to the door.",
    "We're meeting our neighbors for dinner on Friday evening.",
    "The washing machine makes a strange noise when it spins.",
    "He reads the newspaper every morning on the way to work.",
    "The baby finally fell asleep after a long afternoon.",
    "Our neighbor's cat likes to sleep on the warm car roof.",
    "I can't find the charger for my phone anywhere.",
    "They painted the kitchen a bright shade of yellow.",
    "The shop on the corner closes early on Sundays.",
    "He fixed the broken chair with glue and a few nails.",
    "The children argued about whose turn it was to wash the dishes.",
    "She writes a short list of tasks before she goes to bed.",
    "The bus was so crowded that we had to stand.",
    "My brother's new job starts at seven in the morning.",
    "Please water the plants while we are away on holiday.",
    "The lamp in the hallway has been flickering all week.",
    "We spent the whole Saturday cleaning out the garage.",
    # work and school
    "The meeting was moved to the small room on the third floor.",
    "Our teacher asked us to read the first chapter by Monday.",
    "He printed the report and left it on her desk.",
    "The students built a tiny robot that could follow a line.",
    "She's learning to play the violin in the evenings.",
    "The library is quiet except for the sound of turning pages.",
    "Everyone clapped when the team finally finished the project.",
    "The manager explained the new schedule to the whole staff.",
    "I wasn't sure which answer was correct, so I guessed.",
    "The exam results will be posted on the board tomorrow.",
    "Our office moved to a building with a view of the river.",
    "The lecture on ancient languages was surprisingly popular.",
    "He practices his speech in front of the mirror every night.",
    "The new computer system made the work much faster.",
    "She won a prize for her essay about local birds.",
    # sports and hobbies
    "The football match was cancelled because the field was flooded.",
    "He has been collecting old coins since he was a boy.",
    "They go swimming in the lake every morning in summer.",
    "Her painting of the harbor won first prize at the fair.",
    "The runners gathered at the starting line before dawn.",
    "We played cards by candlelight when the power went out.",
    "He knitted a long blue scarf for his sister.",
    "The chess club meets in the back room of the library.",
    "She climbed the steep wall without using the safety rope.",
    "Our team scored twice in the last few minutes of the game.",
    "He spends his weekends repairing old radios and clocks.",
    "The choir practiced the same song again and again.",
    "They hiked through the forest until the trail disappeared.",
    "Gardening keeps my grandfather busy and cheerful all year.",
    "The kite rose quickly and then got stuck in a tree.",
    # animals
    "The horse waited patiently by the gate for its dinner.",
    "A family of ducks crossed the road in a neat line.",
    "The puppy chewed a hole in my favorite pair of shoes.",
    "Wolves usually hunt together in small family groups.",
    "The parrot repeated every word the children said.",
    "A fox slipped quietly through the hedge at midnight.",
    "The farmer's cows are brought in from the field at dusk.",
    "Squirrels hide nuts in the autumn and forget many of them.",
    "The tiny frog was almost invisible against the wet leaves.",
    "An old tortoise lived in the garden for fifty years.",
    "The cat watched the birds through the window all day.",
    "Dolphins swam beside the boat as it left the bay.",
    # city and technology
    "The new bridge will connect the two halves of the city.",
    "Traffic was heavy because of road works near the center.",
    "The streetlights came on one by one along the avenue.",
    "Solar panels now cover the roof of the town library.",
    "He forgot his password and had to reset it again.",
    "The museum offers free tours on the first Sunday of the month.",
    "A street musician played the violin outside the bakery.",
    "The elevator stopped between floors for about ten minutes.",
    "They're planting trees along the main road this spring.",
    "The old factory was turned into apartments and studios.",
    "My laptop battery lasts much longer than it used to.",
    "The city council voted to build a new swimming pool.",
    "Our internet connection drops whenever it rains heavily.",
    "The clock tower in the square chimes every quarter hour.",
    "Electric buses are quieter than the old diesel ones.",
    # stories and feelings
    "She smiled when she saw the letter from her old friend.",
    "He was nervous before the interview but it went well.",
    "The old man told stories about the sea every evening.",
    "They laughed so hard that they could barely breathe.",
    "I'm grateful for the help you gave me last year.",
    "The house felt empty after the guests had gone home.",
    "He promised that he would never be late again.",
    "She kept the secret for many years and told no one.",
    "The little boy was proud of the tower he had built.",
    "We sat on the porch and listened to the crickets.",
    "It's hard to say goodbye to a place you love.",
    "The stranger asked for directions to the railway station.",
    "Her voice was calm even though she was very tired.",
    "They waited for news from the hospital all night.",
    "He found an old photograph hidden inside a book.",
    # miscellaneous facts and observations
    "A good map is useless if you don't know where you are.",
    "The bakery on our street sells the best bread in town.",
    "Paper was once made by hand from cotton and linen rags.",
    "The festival attracts musicians from all over the country.",
    "Reading aloud helps young children learn new words.",
    "The mountain village can only be reached by a narrow path.",
    "Clean water is one of the most important things a town needs.",
    "The price of vegetables rose sharply after the long drought.",
    "Fresh paint was still drying on the front door.",
    "The island has no cars, only bicycles and small boats.",
    "A single candle lit the corner of the dark room.",
    "The orchestra tuned their instruments before the concert began.",
    "Wooden boats need careful repair after every winter.",
    "The long queue outside the theatre moved very slowly.",
    "The old bridge creaked as the heavy cart rolled across.",
    "Ink stains on the desk showed where the writer had worked.",
    "The garden gate squeaked every time someone opened it.",
    "A warm blanket and a good book make a perfect evening.",
    "The harbor master watched the boats return before the storm.",
    "Most people remember the smell of their childhood home.",
    "The glass vase fell from the shelf and shattered on the floor.",
    "We could hear the waves crashing against the rocks below.",
    "The professor's handwriting was almost impossible to read.",
    "A thin layer of dust covered every shelf in the attic.",
    "The village celebrates the harvest with music and dancing.",
]


def normalize_transcript(sentence: str) -> str:
    """Upper-case, hyphens to spaces, keep only A-Z, apostrophe and single spaces."""
    text = sentence.upper().replace("-", " ")
    text = re.sub(r"[^A-Z' ]", "", text)
    return re.sub(r" +", " ", text).strip()


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return proc.stdout + proc.stderr


def sox_stat(path: Path) -> dict[str, float]:
    """Return the numbers printed by `sox FILE -n stat` (written to stderr)."""
    out = run(["sox", str(path), "-n", "stat"])
    stats = {}
    for line in out.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            try:
                stats[" ".join(key.split())] = float(value.strip())
            except ValueError:
                pass
    return stats


def num_samples(path: Path) -> int:
    return int(run(["soxi", "-s", str(path)]).strip())


def check_tools() -> None:
    for tool in ("espeak-ng", "sox", "soxi"):
        if shutil.which(tool) is None:
            sys.exit(f"error: '{tool}' not found; install with: apt-get install -y espeak-ng sox libsox-fmt-all")
    # espeak-ng silently falls back to the default voice for unknown names: check them.
    voices = run(["espeak-ng", "--voices"])
    variants = run(["espeak-ng", "--voices=variant"])
    voice_names = {line.split()[1] for line in voices.splitlines()[1:] if len(line.split()) > 1}
    variant_files = {
        line.split()[4].split("/", 1)[1] for line in variants.splitlines()[1:] if len(line.split()) > 4
    }
    for spk in SPEAKERS:
        if spk.voice not in voice_names:
            sys.exit(f"error: espeak-ng voice {spk.voice!r} not available")
        if spk.variant and spk.variant not in variant_files:
            sys.exit(f"error: espeak-ng variant {spk.variant!r} not available")


def synthesize(spk: Speaker, text: str, out_flac: Path, rng: random.Random, tmp: Path) -> float:
    """Synthesize one utterance to out_flac; return its duration in seconds."""
    raw = tmp / "raw.wav"
    clean = tmp / "clean.wav"
    run(["espeak-ng", "-v", spk.espeak_voice, "-p", str(spk.pitch), "-s", str(spk.rate), "-w", str(raw), text])
    # Resample to 16 kHz mono, trim leading/trailing silence, keep a short natural margin,
    # normalise to -3 dBFS.  -R: repeatable random numbers; -D: no dither.
    effects = ["silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse"]
    if spk.telephone:
        effects += ["sinc", "300-3400"]
    effects += ["pad", f"{rng.uniform(0.10, 0.25):.3f}", f"{rng.uniform(0.15, 0.30):.3f}", "norm", "-3"]
    run(["sox", "-R", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(clean),
         "rate", "-h", str(SAMPLE_RATE)] + effects)
    if not spk.noise:
        run(["sox", "-R", "-D", str(clean), "-b", "16", str(out_flac)])
    else:
        n = num_samples(clean)
        noise = tmp / "noise.wav"
        run(["sox", "-R", "-D", "-n", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(noise),
             "synth", f"{n}s", spk.noise, "vol", "0.5"])
        speech_rms = sox_stat(clean)["RMS amplitude"]
        noise_rms = sox_stat(noise)["RMS amplitude"]
        snr_db = rng.uniform(*spk.snr_db)
        noise_gain = speech_rms / (noise_rms * 10 ** (snr_db / 20.0))
        # Mix, then rescale so the mixture does not clip.
        run(["sox", "-R", "-D", "-m", "-v", "1.0", str(clean), "-v", f"{noise_gain:.6f}", str(noise),
             "-b", "16", str(out_flac), "trim", "0", f"{n}s", "norm", "-2"])
    return num_samples(out_flac) / SAMPLE_RATE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (default: data/)")
    args = parser.parse_args()

    check_tools()
    assert len(set(SENTENCES)) == len(SENTENCES), "duplicate sentences"
    rng = random.Random(args.seed)
    out: Path = args.out
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)

    pool = list(SENTENCES)
    rng.shuffle(pool)
    # chapter ids: one or two chapters per speaker, stable for a given seed
    chapters = {}
    for spk in SPEAKERS:
        n_ch = rng.choice((1, 2))
        chapters[spk.speaker_id] = sorted(rng.sample(range(1000, 9999), n_ch))

    summary = []
    with tempfile.TemporaryDirectory(prefix="w2vcache-corpus-") as tmpdir:
        tmp = Path(tmpdir)
        for split in SPLITS:
            speakers = [s for s in SPEAKERS if s.split == split]
            counters = {(s.speaker_id, c): 0 for s in speakers for c in chapters[s.speaker_id]}
            transcripts: dict[Path, list[str]] = {}
            total, n_utt, turn = 0.0, 0, 0
            while total < SPLIT_TARGET_SECONDS[split]:
                if not pool:
                    sys.exit("error: ran out of sentences; add more to SENTENCES")
                spk = speakers[turn % len(speakers)]
                turn += 1
                chapter = rng.choice(chapters[spk.speaker_id])
                idx = counters[(spk.speaker_id, chapter)]
                utt_id = f"{spk.speaker_id}-{chapter}-{idx:04d}"
                chapter_dir = out / split / str(spk.speaker_id) / str(chapter)
                chapter_dir.mkdir(parents=True, exist_ok=True)
                # take sentences until one gives a duration within bounds
                while True:
                    sentence = pool.pop()
                    flac = chapter_dir / f"{utt_id}.flac"
                    dur = synthesize(spk, sentence, flac, rng, tmp)
                    if MIN_SECONDS <= dur <= MAX_SECONDS:
                        break
                    flac.unlink()
                    print(f"  skipped ({dur:.2f} s): {sentence}", file=sys.stderr)
                counters[(spk.speaker_id, chapter)] += 1
                trans = chapter_dir / f"{spk.speaker_id}-{chapter}.trans.txt"
                transcripts.setdefault(trans, []).append(f"{utt_id} {normalize_transcript(sentence)}")
                total += dur
                n_utt += 1
            for trans, lines in transcripts.items():
                trans.write_text("\n".join(lines) + "\n", encoding="utf-8")
            voices = ", ".join(f"{s.speaker_id}={s.espeak_voice}" for s in speakers)
            summary.append((split, n_utt, len(speakers), total, voices))
            print(f"{split:12s} {n_utt:4d} utts {len(speakers)} spk {total:7.1f} s  [{voices}]")

    grand = sum(row[3] for row in summary)
    print(f"{'total':12s} {sum(r[1] for r in summary):4d} utts {len(SPEAKERS)} spk {grand:7.1f} s "
          f"({grand / 60:.2f} min); {len(pool)} sentences unused")


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C")
    main()
