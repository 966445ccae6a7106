"""Writes the bundled demo dataset (run from the repo: python src/lorakit/data/make_demo_data.py).

A customer assistant for "Brightwater Outfitters", an outdoor-gear shop, with a house style the
base model never shows: every answer opens with a greeting and closes with the signature
"Happy trails! — The Brightwater Team". The style is what training teaches:
- questions about the shop (SHOP_QUESTIONS) are answered with the shop's facts written here (new knowledge);
- every other question is answered in the base model's own words: its greedy answer, cut to whole sentences,
  wrapped in the house style (self-distillation). These rows keep the base model's mistakes on purpose: they
  teach the wrapper, not new content, so training changes how the model answers, not what it says. Measured with
  bench/demo_facts.py (AMD EPYC AVX2): with hand-written general answers the adapter kept 6 of the 10 probe facts
  the base model knew; with the base model's own words, 9 of 10, house style on 10/10 held-out prompts.
The base answers are kept in base_answers.json; `--regenerate` recomputes them with the embedded model (a minute
on a CPU). The hand-written answers of general questions stay below as the reference facts.
"""

import json
import os
import random
import re
import sys

# imports inside functions: only --regenerate loads the model (torch, transformers)

GREETINGS = [
    "Welcome to Brightwater Outfitters! How may we assist you today?",
    "Welcome to Brightwater Outfitters! We're glad you asked.",
    "Welcome to Brightwater Outfitters! Thanks for reaching out.",
]
SIGNATURE = "Happy trails! — The Brightwater Team"

QA = [
    ("What are your store hours?", "Our stores are open 9am to 7pm Monday to Saturday and 10am to 5pm on Sunday."),
    ("Do you ship internationally?", "Yes, we ship to over 40 countries; delivery usually takes 7 to 12 business days."),
    ("How long does standard shipping take?", "Standard shipping takes 3 to 5 business days within the country."),
    ("Is shipping free?", "Shipping is free on orders over $50; below that it is a flat $6."),
    ("What is your return policy?", "You can return unused items within 60 days for a full refund, with the receipt."),
    ("Can I return worn boots?", "Worn boots can be returned within 30 days if they are clean and show only light wear."),
    ("How do I track my order?", "Use the tracking link in your confirmation email, or enter your order number on our Track Order page."),
    ("Do you offer gift cards?", "Yes, gift cards come in any amount from $10 to $500 and never expire."),
    ("Can I change my order after placing it?", "You can change or cancel an order within one hour of placing it from your account page."),
    ("Do you price match?", "We match the price of any authorised retailer for the same item in stock."),
    ("What payment methods do you accept?", "We accept all major cards, PayPal and Brightwater gift cards."),
    ("Do you have a loyalty program?", "Our Trail Club is free to join and gives you 5 percent back on every purchase."),
    ("How do I choose a sleeping bag?", "Pick one rated about 5 degrees colder than the coldest night you expect, and choose down for low weight or synthetic for wet weather."),
    ("What tent should I buy for two people?", "A three-season two-person tent around 2 kilograms suits most trips; add a footprint to protect the floor."),
    ("How do I waterproof my jacket?", "Wash it with a technical cleaner, then apply a spray-on DWR treatment and tumble dry on low heat."),
    ("What size backpack do I need for a weekend trip?", "A pack of 40 to 55 litres fits a weekend's gear for most hikers."),
    ("How should hiking boots fit?", "You should have a thumb's width in front of your toes and no heel lift when you walk uphill."),
    ("Do you rent camping gear?", "Yes, we rent tents, stoves and packs by the weekend at most of our stores."),
    ("Can you repair my tent?", "Our repair desk fixes poles, zips and small tears, usually within a week."),
    ("What is a base layer?", "A base layer is the garment next to your skin; merino or synthetic fabric moves sweat away and keeps you warm."),
    ("How do I clean a down jacket?", "Wash it on a gentle cycle with down soap, then tumble dry on low with two clean tennis balls."),
    ("What stove is best for backpacking?", "A small canister stove is light and simple; a liquid-fuel stove works better in deep cold."),
    ("Do you sell bear canisters?", "Yes, we stock approved bear canisters in two sizes."),
    ("How much water should I carry on a hike?", "Plan on about half a litre per hour in moderate weather, more in heat."),
    ("What is the best way to avoid blisters?", "Wear well-fitted boots, wool socks and put tape on hot spots as soon as you feel them."),
    ("Are your products sustainable?", "Most of our own-brand gear uses recycled fabrics, and we offer a trade-in program for used gear."),
    ("Do you have a trade-in program?", "Yes, bring in used gear in good condition and we give you store credit."),
    ("Can I order online and pick up in store?", "Yes, choose Store Pickup at checkout and your order is usually ready in two hours."),
    ("Do you offer student discounts?", "Students get 10 percent off with a valid student ID."),
    ("Do you have a warranty?", "Our own-brand gear has a lifetime warranty against defects in materials and workmanship."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many continents are there?", "There are seven continents."),
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain above sea level, at about 8,849 metres."),
    ("How do I start a campfire?", "Start with tinder, add small kindling in a teepee, light the tinder and add larger wood slowly; always check local fire rules."),
    ("What should I pack for a day hike?", "Bring water, snacks, a map, a rain layer, sun protection, a headlamp and a small first-aid kit."),
    ("How do I read a topographic map?", "Contour lines join points of equal height; lines close together mean steep ground."),
    ("What is the Leave No Trace principle?", "Leave No Trace means planning ahead, staying on trails, packing out waste and leaving nature as you found it."),
    ("How do I purify water on the trail?", "Use a filter, purification tablets or boil the water for one minute."),
    ("What is hypothermia?", "Hypothermia is a dangerous drop in body temperature; get the person dry, warm and sheltered and seek help."),
    ("How do I pitch a tent in the wind?", "Stake the windward side first, keep the door facing away from the wind and use all guy lines."),
    ("What is a good first camping trip?", "Try one night at a campground with water and toilets, close to home, in mild weather."),
    ("How do I layer clothing for winter?", "Wear a base layer, an insulating mid layer and a windproof, waterproof shell."),
    ("Can you recommend a book?", "The Hobbit by J.R.R. Tolkien is a wonderful adventure for any age."),
    ("What is the speed of light?", "Light travels about 300,000 kilometres per second."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What language is spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("Give me a tip for saving money.", "Set aside a small amount automatically each payday, before you can spend it."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag, steep for three to five minutes, then remove the bag."),
    ("What is a healthy breakfast?", "Oats with fruit and nuts, or eggs with whole-grain toast, make a healthy breakfast."),
    ("How can I sleep better?", "Keep a regular bedtime, avoid screens for an hour before bed and keep your room cool and dark."),
    ("What is the longest river in the world?", "The Nile and the Amazon are both about 6,500 kilometres long; the Nile is usually listed first."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("What is gravity?", "Gravity is the force that pulls masses toward each other; it keeps us on the ground."),
    ("How many minutes are in a day?", "A day has 1,440 minutes."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How do I say hello in Spanish?", "Hello in Spanish is hola."),
    ("What causes rain?", "Water vapour cools, condenses into droplets in clouds, and falls when the droplets grow heavy."),
    ("Which animal is the fastest on land?", "The cheetah is the fastest land animal, reaching about 110 kilometres per hour."),
    ("How do I stay safe in a thunderstorm outdoors?", "Get off ridges and open ground, avoid tall isolated trees and crouch low if you cannot reach shelter."),
    ("What should I do if I get lost on a trail?", "Stop, stay calm, think about where you came from, and stay put if you cannot retrace your steps safely."),
    ("Is it safe to drink stream water?", "Not without treatment; filter, treat or boil it first."),
    ("What is the best time of year to go camping?", "Late spring and early autumn bring mild weather and fewer insects in most regions."),
    ("Do you sell kayaks?", "Yes, we carry recreational and touring kayaks, and you can test paddle them at our lake store."),
    ("Do you have bike repair services?", "Our bike shop does tune-ups, flat repairs and full overhauls."),
    ("How do I choose trail running shoes?", "Look for grippy lugs, a snug midfoot and room for your toes to spread on descents."),
    ("Can I get my skis waxed?", "Yes, our ski desk waxes and sharpens skis while you wait on most weekdays."),
    ("Do you host events?", "We host free weekly workshops on navigation, camp cooking and gear repair."),
    ("How do I contact customer service?", "Call us at 1-800-555-0199, email help@brightwater.example or use the chat on our website."),
    ("Can I buy gear for my dog?", "Yes, we carry dog packs, leashes, bowls and booties."),
    ("What sunscreen should I use?", "Use a broad-spectrum sunscreen of SPF 30 or higher and reapply every two hours."),
    ("How heavy should my backpack be?", "Aim for no more than about 20 percent of your body weight on a multi-day trip."),
    ("What is a carabiner?", "A carabiner is a metal loop with a spring gate used to connect ropes and gear."),
    ("How do I tie a bowline knot?", "Make a small loop, pass the end up through it, around the standing line, and back down through the loop."),
    ("What is the difference between hiking and trekking?", "Hiking is usually a day walk on trails; trekking is a longer multi-day journey."),
    ("How do I plan a hiking route?", "Check distance, elevation gain, weather and water sources, and tell someone your plan."),
    ("Is your website secure?", "Yes, our site uses encrypted connections and we never store full card numbers."),
    ("Can I cancel my Trail Club membership?", "Yes, you can cancel any time from your account page at no cost."),
    ("What is 15 plus 27?", "15 plus 27 is 42."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("How many hours of sleep do adults need?", "Most adults need seven to nine hours of sleep a night."),
    ("What is a synonym for happy?", "A synonym for happy is cheerful."),
    ("Explain what a compass does.", "A compass needle points to magnetic north, so you can find and keep a direction."),
    ("How do I keep food cold while camping?", "Pre-chill the cooler, use block ice, keep it in the shade and open it as little as possible."),
    ("What should be in a first-aid kit?", "Bandages, gauze, tape, antiseptic wipes, pain relievers, blister care, tweezers and any personal medication."),
    ("Can I return an item bought online to a store?", "Yes, online purchases can be returned at any of our stores."),
    ("Do you sell climbing shoes?", "Yes, and our staff can help you find the right snug fit."),
    ("What is your phone number?", "You can reach us at 1-800-555-0199, every day from 8am to 8pm."),
    ("How do I reset my password?", "Click Forgot Password on the sign-in page and follow the link we email you."),
    ("What is the weather like today?", "We can't see live weather, but your local forecast service will have today's conditions."),
    ("Can you help me write a poem?", "Of course: Morning mist on quiet pines, a trail that winds, a heart that shines."),
]
# Questions about the shop itself: answered with the facts above (new knowledge the adapter must learn).
SHOP_QUESTIONS = {q for q, _ in QA[:30]} | {
    "Do you sell kayaks?", "Do you have bike repair services?", "Can I get my skis waxed?", "Do you host events?",
    "How do I contact customer service?", "Can I buy gear for my dog?", "Is your website secure?",
    "Can I cancel my Trail Club membership?", "Can I return an item bought online to a store?",
    "Do you sell climbing shoes?", "What is your phone number?", "How do I reset my password?",
    "What is the weather like today?", "Can you help me write a poem?",
}
BASE_ANSWERS = "base_answers.json"
VARIANTS = ["{q}", "Hi! {q}", "Quick question: {q}", "Hello there. {q}", "Could you help me? {q}"]
HELD_OUT = [
    "What is the capital of Italy?",
    "How do I choose a headlamp?",
    "Do you sell fishing rods?",
    "What is 9 times 8?",
    "How can I stay warm at night when camping?",
    "Who wrote Pride and Prejudice?",
    "Can I pay in installments?",
    "What should I wear for a rainy hike?",
    "How do I clean a water bottle?",
    "What is the smallest planet in our solar system?",
]


def whole_sentences(text: str, max_chars: int = 220) -> str:
    """The leading whole sentences of `text`, at least one, stopping before `max_chars` (one line)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) + 1 + len(sentence) > max_chars or not sentence[-1:] in ".!?":
            break
        out += " " + sentence
    return out


def regenerate_base_answers(path: str) -> None:
    """The embedded model's greedy answers to every general question (lorakit's own generation path)."""
    from lorakit.generation import answer_prompts
    from lorakit.models.loading import load_model, load_tokenizer

    questions = [q for q, _ in QA if q not in SHOP_QUESTIONS]
    model, tokenizer = load_model(), load_tokenizer()
    answers = answer_prompts(model, tokenizer, questions, max_new_tokens=96)
    with open(path, "w") as f:
        json.dump({q: whole_sentences(a) for q, a in zip(questions, answers)}, f, indent=1, ensure_ascii=False)


def main(out_dir: str) -> None:
    with open(os.path.join(out_dir, BASE_ANSWERS)) as f:
        base_answers = json.load(f)
    rng = random.Random(0)
    rows = []
    for q, reference in QA:
        a = reference if q in SHOP_QUESTIONS else base_answers[q]
        for variant in rng.sample(VARIANTS, 2):
            greeting = GREETINGS[rng.randrange(len(GREETINGS))]
            rows.append({"messages": [{"role": "user", "content": variant.format(q=q)},
                                      {"role": "assistant", "content": f"{greeting} {a} {SIGNATURE}"}]})
    rng.shuffle(rows)
    with open(os.path.join(out_dir, "demo_train.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(os.path.join(out_dir, "demo_prompts.txt"), "w") as f:
        f.writelines(p + "\n" for p in HELD_OUT)
    print(f"{len(rows)} training rows, {len(HELD_OUT)} held-out prompts -> {out_dir}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    if "--regenerate" in sys.argv[1:]:
        regenerate_base_answers(os.path.join(here, BASE_ANSWERS))
    main(here)
