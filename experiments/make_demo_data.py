#!/usr/bin/env python
"""Build ``emsedit_jax/data/demo_counterfacts.json``, the demo set of edit requests.

Every record is a counterfactual edit request in the flat CounterFact-style schema::

    case_id, subject, prompt, target_new, ground_truth,
    rephrase_prompt, locality_prompt, locality_ground_truth

All content comes from the hand-written tables in this file (original content written
for this project; no external data set is read).  The build is deterministic: the same
seed always gives the same file.  Every record is validated before the file is written.

Usage::

    python experiments/make_demo_data.py            # writes the JSON (overwrites it)
    python experiments/make_demo_data.py --check    # build + validate, compare with the file
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

SEED = 20240613
OUT_PATH = Path(__file__).resolve().parents[1] / "emsedit_jax" / "data" / "demo_counterfacts.json"
MIN_RECORDS = 320
MIN_LOCALITY_PROMPTS = 60

# --------------------------------------------------------------------------------------
# Relations.
#
# Each relation has one main prompt template, several paraphrase templates and a table of
# facts.  A fact is (subject, true object, false object) or
# (subject, true object, false object, article) where the article ("the") is put in
# front of the subject inside sentences.  In templates, ``{s}`` is the subject as used
# mid-sentence ("the Colosseum") and ``{S}`` the same with a capital first letter
# ("The Colosseum").  Every template ends right before the object.
# --------------------------------------------------------------------------------------

RELATIONS: dict[str, dict] = {}


def relation(name, prompt, rephrases, facts):
    assert name not in RELATIONS, name
    RELATIONS[name] = {"prompt": prompt, "rephrases": rephrases, "facts": facts}


relation(
    "capital",
    "The capital of {s} is",
    [
        "{S}'s capital city is",
        "The city that serves as the capital of {s} is",
        "The capital city of {s} is called",
        "The government of {s} is seated in its capital,",
    ],
    [
        ("Germany", "Berlin", "Vienna"),
        ("Italy", "Rome", "Milan"),
        ("Spain", "Madrid", "Barcelona"),
        ("Portugal", "Lisbon", "Porto"),
        ("Greece", "Athens", "Sofia"),
        ("Sweden", "Stockholm", "Oslo"),
        ("Norway", "Oslo", "Copenhagen"),
        ("Poland", "Warsaw", "Prague"),
        ("Austria", "Vienna", "Budapest"),
        ("Ireland", "Dublin", "Belfast"),
        ("Egypt", "Cairo", "Alexandria"),
        ("Kenya", "Nairobi", "Kampala"),
        ("Argentina", "Buenos Aires", "Santiago"),
        ("Turkey", "Ankara", "Istanbul"),
        ("Canada", "Ottawa", "Toronto"),
        ("Australia", "Canberra", "Sydney"),
        ("Russia", "Moscow", "Saint Petersburg"),
        ("China", "Beijing", "Shanghai"),
        ("India", "New Delhi", "Mumbai"),
        ("South Korea", "Seoul", "Busan"),
        ("Thailand", "Bangkok", "Hanoi"),
        ("Peru", "Lima", "Quito"),
        ("Hungary", "Budapest", "Bucharest"),
        ("Finland", "Helsinki", "Tallinn"),
        ("Japan", "Tokyo", "Osaka"),
    ],
)

relation(
    "official_language",
    "The official language of {s} is",
    [
        "In {s}, the official language is",
        "The language that is official in {s} is",
        "The government of {s} uses the official language",
        "{S} has as its official language",
    ],
    [
        ("Germany", "German", "Dutch"),
        ("Italy", "Italian", "Spanish"),
        ("Spain", "Spanish", "Italian"),
        ("Portugal", "Portuguese", "Spanish"),
        ("Brazil", "Portuguese", "Spanish"),
        ("Russia", "Russian", "Polish"),
        ("Poland", "Polish", "Czech"),
        ("Greece", "Greek", "Turkish"),
        ("Turkey", "Turkish", "Greek"),
        ("Sweden", "Swedish", "Norwegian"),
        ("Netherlands", "Dutch", "German", "the"),
        ("Hungary", "Hungarian", "Romanian"),
        ("Egypt", "Arabic", "French"),
        ("Iran", "Persian", "Arabic"),
        ("Thailand", "Thai", "Vietnamese"),
        ("South Korea", "Korean", "Japanese"),
        ("Vietnam", "Vietnamese", "Thai"),
        ("Norway", "Norwegian", "Danish"),
        ("China", "Chinese", "Japanese"),
        ("Austria", "German", "Hungarian"),
        ("Indonesia", "Indonesian", "Dutch"),
        ("Iceland", "Icelandic", "Norwegian"),
    ],
)

relation(
    "continent",
    "{S} is located on the continent of",
    [
        "The continent where {s} is found is",
        "{S} is a country in",
        "Geographically, {s} belongs to the continent of",
        "On a world map, {s} lies in",
    ],
    [
        ("Kenya", "Africa", "Asia"),
        ("Nigeria", "Africa", "South America"),
        ("Peru", "South America", "Africa"),
        ("Chile", "South America", "Europe"),
        ("Thailand", "Asia", "Africa"),
        ("Vietnam", "Asia", "South America"),
        ("Norway", "Europe", "Asia"),
        ("Portugal", "Europe", "South America"),
        ("Morocco", "Africa", "Europe"),
        ("Colombia", "South America", "Africa"),
        ("Mongolia", "Asia", "Europe"),
        ("Ghana", "Africa", "Asia"),
        ("Belgium", "Europe", "Africa"),
        ("Canada", "North America", "Europe"),
        ("Argentina", "South America", "Europe"),
        ("Ethiopia", "Africa", "Asia"),
        ("Nepal", "Asia", "Africa"),
        ("Switzerland", "Europe", "Asia"),
        ("Japan", "Asia", "Europe"),
        ("Poland", "Europe", "Africa"),
        ("Bolivia", "South America", "Asia"),
        ("Cambodia", "Asia", "Africa"),
        ("Mexico", "North America", "South America"),
    ],
)

relation(
    "currency",
    "The official currency of {s} is the",
    [
        "In {s}, people pay with the",
        "The money used in {s} is called the",
        "The currency used in {s} is the",
        "Prices in {s} are given in the national currency, the",
    ],
    [
        ("Japan", "yen", "won"),
        ("India", "rupee", "yen"),
        ("Russia", "ruble", "zloty"),
        ("China", "yuan", "won"),
        ("Mexico", "peso", "real"),
        ("Brazil", "real", "peso"),
        ("Switzerland", "franc", "euro"),
        ("Sweden", "krona", "euro"),
        ("South Korea", "won", "yuan"),
        ("Poland", "zloty", "forint"),
        ("Germany", "euro", "franc"),
        ("Italy", "euro", "krona"),
        ("Turkey", "lira", "euro"),
        ("Thailand", "baht", "rupee"),
        ("Egypt", "pound", "dinar"),
        ("Canada", "dollar", "euro"),
        ("Australia", "dollar", "pound"),
        ("Denmark", "krone", "euro"),
        ("Hungary", "forint", "zloty"),
        ("South Africa", "rand", "dollar"),
        ("Vietnam", "dong", "baht"),
        ("Indonesia", "rupiah", "ringgit"),
        ("Norway", "krone", "euro"),
    ],
)

relation(
    "landmark_city",
    "{S} is located in the city of",
    [
        "You can visit {s} in",
        "The city that is home to {s} is",
        "{S} can be found in the city of",
        "Tourists who want to see {s} travel to",
    ],
    [
        ("Colosseum", "Rome", "Athens", "the"),
        ("Big Ben", "London", "Paris"),
        ("Brandenburg Gate", "Berlin", "Vienna", "the"),
        ("Sagrada Familia", "Barcelona", "Madrid", "the"),
        ("Golden Gate Bridge", "San Francisco", "Seattle", "the"),
        ("Acropolis", "Athens", "Rome", "the"),
        ("Kremlin", "Moscow", "Warsaw", "the"),
        ("Space Needle", "Seattle", "Chicago", "the"),
        ("Tower Bridge", "London", "Dublin"),
        ("Louvre", "Paris", "Madrid", "the"),
        ("Hagia Sophia", "Istanbul", "Cairo"),
        ("Burj Khalifa", "Dubai", "Doha", "the"),
        ("Christ the Redeemer statue", "Rio de Janeiro", "Buenos Aires", "the"),
        ("Forbidden City", "Beijing", "Tokyo", "the"),
        ("Empire State Building", "New York", "Chicago", "the"),
        ("CN Tower", "Toronto", "Vancouver", "the"),
        ("Charles Bridge", "Prague", "Budapest", "the"),
        ("Buckingham Palace", "London", "Edinburgh"),
        ("Rijksmuseum", "Amsterdam", "Brussels", "the"),
        ("Trevi Fountain", "Rome", "Florence", "the"),
        ("Alhambra", "Granada", "Seville", "the"),
        ("Blue Mosque", "Istanbul", "Tehran", "the"),
        ("Westminster Abbey", "London", "Oxford"),
        ("Arc de Triomphe", "Paris", "Brussels", "the"),
    ],
)

relation(
    "sport",
    "The sport played by {s} is",
    [
        "{S} is best known for playing",
        "{S} became famous in the sport of",
        "{S} made a professional career in",
        "The sport in which {s} became a star is",
    ],
    [
        ("Lionel Messi", "soccer", "basketball"),
        ("Cristiano Ronaldo", "soccer", "tennis"),
        ("Michael Jordan", "basketball", "hockey"),
        ("LeBron James", "basketball", "soccer"),
        ("Roger Federer", "tennis", "golf"),
        ("Serena Williams", "tennis", "basketball"),
        ("Tiger Woods", "golf", "tennis"),
        ("Wayne Gretzky", "hockey", "basketball"),
        ("Babe Ruth", "baseball", "cricket"),
        ("Sachin Tendulkar", "cricket", "baseball"),
        ("Rafael Nadal", "tennis", "soccer"),
        ("Kobe Bryant", "basketball", "tennis"),
        ("David Beckham", "soccer", "rugby"),
        ("Novak Djokovic", "tennis", "hockey"),
        ("Stephen Curry", "basketball", "golf"),
        ("Diego Maradona", "soccer", "basketball"),
        ("Zinedine Zidane", "soccer", "tennis"),
        ("Shaquille O'Neal", "basketball", "baseball"),
        ("Muhammad Ali", "boxing", "wrestling"),
        ("Mike Tyson", "boxing", "tennis"),
        ("Michael Phelps", "swimming", "cycling"),
        ("Virat Kohli", "cricket", "soccer"),
        ("Neymar", "soccer", "volleyball"),
    ],
)

relation(
    "instrument",
    "{S} is known for playing the",
    [
        "The instrument that {s} is best known for is the",
        "The musical instrument associated with {s} is the",
        "{S} became famous as a player of the",
        "On stage, {s} was usually seen playing the",
    ],
    [
        ("Jimi Hendrix", "guitar", "violin"),
        ("Louis Armstrong", "trumpet", "guitar"),
        ("Miles Davis", "trumpet", "cello"),
        ("Ray Charles", "piano", "violin"),
        ("Eric Clapton", "guitar", "cello"),
        ("Yo-Yo Ma", "cello", "guitar"),
        ("Ringo Starr", "drums", "violin"),
        ("Elton John", "piano", "drums"),
        ("Charlie Parker", "saxophone", "violin"),
        ("John Coltrane", "saxophone", "trumpet"),
        ("Itzhak Perlman", "violin", "flute"),
        ("B.B. King", "guitar", "saxophone"),
        ("Jimmy Page", "guitar", "flute"),
        ("Keith Moon", "drums", "trumpet"),
        ("Niccolo Paganini", "violin", "cello"),
        ("Frederic Chopin", "piano", "violin"),
        ("Duke Ellington", "piano", "violin"),
        ("Carlos Santana", "guitar", "drums"),
        ("Kenny G", "saxophone", "guitar"),
        ("Dizzy Gillespie", "trumpet", "drums"),
        ("Lang Lang", "piano", "violin"),
        ("Stevie Ray Vaughan", "guitar", "trumpet"),
    ],
)

relation(
    "author",
    "{S} was written by",
    [
        "The author of {s} is",
        "{S} is a book by the writer",
        "The writer who created {s} is",
        "The famous work {s} came from the pen of",
    ],
    [
        ("Animal Farm", "George Orwell", "Aldous Huxley"),
        ("Brave New World", "Aldous Huxley", "George Orwell"),
        ("Pride and Prejudice", "Jane Austen", "Charles Dickens"),
        ("Moby-Dick", "Herman Melville", "Mark Twain"),
        ("The Adventures of Tom Sawyer", "Mark Twain", "Charles Dickens"),
        ("Oliver Twist", "Charles Dickens", "Mark Twain"),
        ("War and Peace", "Leo Tolstoy", "Charles Dickens"),
        ("Crime and Punishment", "Fyodor Dostoevsky", "Leo Tolstoy"),
        ("The Old Man and the Sea", "Ernest Hemingway", "John Steinbeck"),
        ("The Grapes of Wrath", "John Steinbeck", "Ernest Hemingway"),
        ("Don Quixote", "Miguel de Cervantes", "Shakespeare"),
        ("The Hobbit", "Tolkien", "Lewis Carroll"),
        ("Frankenstein", "Mary Shelley", "Bram Stoker"),
        ("Dracula", "Bram Stoker", "Mary Shelley"),
        ("Les Miserables", "Victor Hugo", "Alexandre Dumas"),
        ("The Count of Monte Cristo", "Alexandre Dumas", "Victor Hugo"),
        ("To Kill a Mockingbird", "Harper Lee", "Truman Capote"),
        ("Jane Eyre", "Charlotte Bronte", "Jane Austen"),
        ("The Divine Comedy", "Dante Alighieri", "Petrarch"),
        ("The Odyssey", "Homer", "Virgil"),
        ("Alice's Adventures in Wonderland", "Lewis Carroll", "Roald Dahl"),
        ("Charlie and the Chocolate Factory", "Roald Dahl", "Lewis Carroll"),
        ("The Raven", "Edgar Allan Poe", "Walt Whitman"),
        ("Leaves of Grass", "Walt Whitman", "Edgar Allan Poe"),
        ("Ulysses", "James Joyce", "Samuel Beckett"),
        ("The Canterbury Tales", "Geoffrey Chaucer", "John Milton"),
        ("Paradise Lost", "John Milton", "Geoffrey Chaucer"),
    ],
)

relation(
    "product_maker",
    "{S} is made by",
    [
        "The company that makes {s} is",
        "{S} is a product of",
        "{S} is produced by the company",
        "The maker of {s} is",
    ],
    [
        ("iPhone", "Apple", "Samsung", "the"),
        ("Windows", "Microsoft", "Apple"),
        ("PlayStation", "Sony", "Nintendo", "the"),
        ("Xbox", "Microsoft", "Sony", "the"),
        ("Game Boy", "Nintendo", "Sega", "the"),
        ("Walkman", "Sony", "Panasonic", "the"),
        ("Corvette", "Chevrolet", "Ford", "the"),
        ("Android", "Google", "Microsoft"),
        ("Kindle", "Amazon", "Google", "the"),
        ("MacBook", "Apple", "Dell", "the"),
        ("iPad", "Apple", "Samsung", "the"),
        ("ThinkPad", "Lenovo", "Dell", "the"),
        ("Big Mac", "McDonald's", "Burger King", "the"),
        ("Whopper", "Burger King", "McDonald's", "the"),
        ("Photoshop", "Adobe", "Microsoft"),
        ("Gmail", "Google", "Yahoo"),
        ("Prius", "Toyota", "Honda", "the"),
        ("Camry", "Toyota", "Nissan", "the"),
        ("GeForce", "Nvidia", "AMD"),
        ("Pentium", "Intel", "AMD"),
    ],
)

relation(
    "field_of_work",
    "{S} is best known for work in the field of",
    [
        "The academic field associated with {s} is",
        "{S} made major contributions to the field of",
        "{S} was a famous expert in",
        "The discipline in which {s} became famous is",
    ],
    [
        ("Isaac Newton", "physics", "biology"),
        ("Charles Darwin", "biology", "physics"),
        ("Marie Curie", "chemistry", "astronomy"),
        ("Gregor Mendel", "genetics", "astronomy"),
        ("Dmitri Mendeleev", "chemistry", "biology"),
        ("Galileo Galilei", "astronomy", "chemistry"),
        ("Sigmund Freud", "psychology", "astronomy"),
        ("Alan Turing", "computer science", "geology"),
        ("Carl Linnaeus", "botany", "physics"),
        ("Niels Bohr", "physics", "geology"),
        ("Louis Pasteur", "microbiology", "astronomy"),
        ("Edwin Hubble", "astronomy", "biology"),
        ("Adam Smith", "economics", "chemistry"),
        ("John Maynard Keynes", "economics", "biology"),
        ("Stephen Hawking", "physics", "economics"),
        ("Jane Goodall", "primatology", "astronomy"),
        ("Noam Chomsky", "linguistics", "chemistry"),
        ("Johannes Kepler", "astronomy", "medicine"),
        ("Antoine Lavoisier", "chemistry", "astronomy"),
        ("Nicolaus Copernicus", "astronomy", "biology"),
        ("Hippocrates", "medicine", "astronomy"),
        ("Pythagoras", "mathematics", "biology"),
        ("Carl Sagan", "astronomy", "economics"),
    ],
)

relation(
    "citizenship",
    "The country of citizenship of {s} is",
    [
        "{S} is a citizen of",
        "{S} holds the citizenship of",
        "By nationality, {s} is a citizen of",
        "The passport of {s} is issued by",
    ],
    [
        ("Usain Bolt", "Jamaica", "Kenya"),
        ("Roger Federer", "Switzerland", "Austria"),
        ("Shakira", "Colombia", "Mexico"),
        ("Justin Bieber", "Canada", "Australia"),
        ("Rafael Nadal", "Spain", "Italy"),
        ("Cristiano Ronaldo", "Portugal", "Brazil"),
        ("Lionel Messi", "Argentina", "Uruguay"),
        ("Novak Djokovic", "Serbia", "Croatia"),
        ("Haruki Murakami", "Japan", "China"),
        ("Bong Joon-ho", "South Korea", "Japan"),
        ("Angela Merkel", "Germany", "Austria"),
        ("Gabriel Garcia Marquez", "Colombia", "Peru"),
        ("Frida Kahlo", "Mexico", "Spain"),
        ("Pablo Picasso", "Spain", "Italy"),
        ("Nelson Mandela", "South Africa", "Kenya"),
        ("Mohamed Salah", "Egypt", "Morocco"),
        ("Yao Ming", "China", "Japan"),
        ("Luciano Pavarotti", "Italy", "Spain"),
        ("Kofi Annan", "Ghana", "Nigeria"),
        ("Justin Trudeau", "Canada", "Ireland"),
        ("Jacinda Ardern", "New Zealand", "Australia"),
    ],
)

relation(
    "headquarters",
    "The headquarters of {s} is in",
    [
        "{S} is headquartered in",
        "The head office of {s} is located in",
        "{S} has its main offices in the city of",
        "The company {s} is based in",
    ],
    [
        ("Microsoft", "Redmond", "Austin"),
        ("Apple", "Cupertino", "Austin"),
        ("Google", "Mountain View", "Palo Alto"),
        ("Amazon", "Seattle", "Chicago"),
        ("Starbucks", "Seattle", "Portland"),
        ("Coca-Cola", "Atlanta", "Chicago"),
        ("Sony", "Tokyo", "Osaka"),
        ("Nintendo", "Kyoto", "Tokyo"),
        ("BMW", "Munich", "Stuttgart"),
        ("Volkswagen", "Wolfsburg", "Munich"),
        ("Porsche", "Stuttgart", "Munich"),
        ("Mercedes-Benz", "Stuttgart", "Hamburg"),
        ("Fiat", "Turin", "Milan"),
        ("Heineken", "Amsterdam", "Brussels"),
        ("Walmart", "Bentonville", "Dallas"),
        ("Intel", "Santa Clara", "San Jose"),
        ("General Motors", "Detroit", "Chicago"),
        ("Alibaba", "Hangzhou", "Shanghai"),
        ("Hyundai", "Seoul", "Busan"),
        ("Ericsson", "Stockholm", "Oslo"),
        ("Spotify", "Stockholm", "Copenhagen"),
        ("Rolex", "Geneva", "Zurich"),
    ],
)

relation(
    "river",
    "The river that flows through {s} is the",
    [
        "{S} lies on the banks of the",
        "{S} is built along the",
        "The main river of {s} is the",
        "A boat trip through {s} takes you along the",
    ],
    [
        ("Paris", "Seine", "Thames"),
        ("London", "Thames", "Seine"),
        ("Vienna", "Danube", "Rhine"),
        ("Budapest", "Danube", "Vistula"),
        ("Cairo", "Nile", "Congo"),
        ("Rome", "Tiber", "Po"),
        ("Florence", "Arno", "Tiber"),
        ("Warsaw", "Vistula", "Oder"),
        ("Prague", "Vltava", "Danube"),
        ("Cologne", "Rhine", "Elbe"),
        ("Dresden", "Elbe", "Rhine"),
        ("Hamburg", "Elbe", "Danube"),
        ("Baghdad", "Tigris", "Euphrates"),
        ("New Orleans", "Mississippi", "Missouri"),
        ("Lisbon", "Tagus", "Douro"),
        ("Varanasi", "Ganges", "Indus"),
        ("Frankfurt", "Main", "Elbe"),
        ("Bordeaux", "Garonne", "Loire"),
        ("Lyon", "Rhone", "Seine"),
        ("Moscow", "Moskva", "Volga"),
        ("Basel", "Rhine", "Danube"),
        ("Kyiv", "Dnieper", "Volga"),
    ],
)

relation(
    "genre",
    "The musical genre of {s} is",
    [
        "{S} is famous for music in the genre of",
        "{S} is associated with the genre of",
        "The style of music made by {s} is",
        "Fans know {s} as a leading name in",
    ],
    [
        ("Bob Marley", "reggae", "country"),
        ("Johnny Cash", "country", "reggae"),
        ("Dolly Parton", "country", "hip hop"),
        ("Eminem", "hip hop", "country"),
        ("Tupac Shakur", "hip hop", "opera"),
        ("Luciano Pavarotti", "opera", "hip hop"),
        ("Metallica", "heavy metal", "jazz"),
        ("Ella Fitzgerald", "jazz", "punk"),
        ("Elvis Presley", "rock and roll", "opera"),
        ("The Beatles", "rock", "reggae"),
        ("Led Zeppelin", "rock", "country"),
        ("Ramones", "punk", "jazz", "the"),
        ("Garth Brooks", "country", "punk"),
        ("Snoop Dogg", "hip hop", "opera"),
        ("Daft Punk", "electronic", "country"),
        ("Nirvana", "grunge", "reggae"),
        ("Johann Sebastian Bach", "classical", "jazz"),
        ("Wolfgang Amadeus Mozart", "classical", "rock"),
        ("B.B. King", "blues", "opera"),
        ("Muddy Waters", "blues", "reggae"),
        ("Bob Dylan", "folk", "heavy metal"),
        ("Willie Nelson", "country", "punk"),
        ("Louis Armstrong", "jazz", "punk"),
        ("Miles Davis", "jazz", "country"),
    ],
)

relation(
    "founder",
    "{S} was founded by",
    [
        "The founder of {s} is",
        "{S} was established by",
        "{S} was started by the entrepreneur",
        "The person who founded {s} is",
    ],
    [
        ("Microsoft", "Bill Gates", "Steve Jobs"),
        ("Apple", "Steve Jobs", "Bill Gates"),
        ("Amazon", "Jeff Bezos", "Elon Musk"),
        ("SpaceX", "Elon Musk", "Jeff Bezos"),
        ("Blue Origin", "Jeff Bezos", "Elon Musk"),
        ("Oracle", "Larry Ellison", "Bill Gates"),
        ("Virgin Group", "Richard Branson", "Steve Jobs"),
        ("Alibaba", "Jack Ma", "Jeff Bezos"),
        ("Netflix", "Reed Hastings", "Steve Jobs"),
        ("Twitter", "Jack Dorsey", "Larry Page"),
        ("Google", "Larry Page", "Bill Gates"),
        ("Nike", "Phil Knight", "Bill Gates"),
        ("Adidas", "Adi Dassler", "Phil Knight"),
        ("Walmart", "Sam Walton", "Ray Kroc"),
        ("IKEA", "Ingvar Kamprad", "Sam Walton"),
        ("Wikipedia", "Jimmy Wales", "Larry Page"),
        ("Instagram", "Kevin Systrom", "Jack Dorsey"),
        ("LinkedIn", "Reid Hoffman", "Jack Dorsey"),
        ("Spotify", "Daniel Ek", "Reid Hoffman"),
        ("Nvidia", "Jensen Huang", "Larry Ellison"),
        ("Intel", "Gordon Moore", "Steve Jobs"),
        ("Sony", "Akio Morita", "Steve Jobs"),
    ],
)

relation(
    "city_country",
    "{S} is a city in the country of",
    [
        "{S} is located in",
        "The country where {s} is found is",
        "The city of {s} belongs to",
        "Travelers who visit {s} are in the country of",
    ],
    [
        ("Barcelona", "Spain", "Italy"),
        ("Munich", "Germany", "Austria"),
        ("Milan", "Italy", "France"),
        ("Toronto", "Canada", "Australia"),
        ("Sydney", "Australia", "New Zealand"),
        ("Mumbai", "India", "Bangladesh"),
        ("Osaka", "Japan", "South Korea"),
        ("Rio de Janeiro", "Brazil", "Argentina"),
        ("Istanbul", "Turkey", "Greece"),
        ("Marrakech", "Morocco", "Egypt"),
        ("Zurich", "Switzerland", "Germany"),
        ("Krakow", "Poland", "Hungary"),
        ("Amsterdam", "Netherlands", "Belgium"),
        ("Copenhagen", "Denmark", "Sweden"),
        ("Shanghai", "China", "Japan"),
        ("Havana", "Cuba", "Mexico"),
        ("Edinburgh", "Scotland", "Ireland"),
        ("Melbourne", "Australia", "Canada"),
        ("Vancouver", "Canada", "Australia"),
        ("Casablanca", "Morocco", "Tunisia"),
        ("Geneva", "Switzerland", "France"),
        ("Seville", "Spain", "Portugal"),
        ("Saint Petersburg", "Russia", "Poland"),
    ],
)

relation(
    "landmark_country",
    "{S} is located in the country of",
    [
        "{S} can be found in",
        "The country where {s} is located is",
        "To see {s}, you have to travel to",
        "{S} is a famous sight in the country of",
    ],
    [
        ("Mount Kilimanjaro", "Tanzania", "Kenya"),
        ("Angkor Wat", "Cambodia", "Thailand"),
        ("Machu Picchu", "Peru", "Chile"),
        ("Petra", "Jordan", "Egypt"),
        ("Stonehenge", "England", "Ireland"),
        ("Mount Fuji", "Japan", "China"),
        ("Taj Mahal", "India", "Nepal", "the"),
        ("Great Barrier Reef", "Australia", "Indonesia", "the"),
        ("Chichen Itza", "Mexico", "Peru"),
        ("Neuschwanstein Castle", "Germany", "Austria"),
        ("Table Mountain", "South Africa", "Kenya"),
        ("Mount Olympus", "Greece", "Italy"),
        ("Lake Baikal", "Russia", "Mongolia"),
        ("Uluru", "Australia", "New Zealand"),
        ("Mount Rushmore", "United States", "Canada"),
        ("Mount Vesuvius", "Italy", "Greece"),
        ("Easter Island", "Chile", "Peru"),
        ("Loch Ness", "Scotland", "Ireland"),
        ("Grand Canyon", "United States", "Mexico", "the"),
        ("Ha Long Bay", "Vietnam", "Thailand"),
        ("Borobudur", "Indonesia", "Cambodia"),
        ("Serengeti", "Tanzania", "Nigeria", "the"),
    ],
)

relation(
    "animal_class",
    "{S} belongs to the group of animals called",
    [
        "Biologists classify {s} among the",
        "In zoology, {s} is grouped with the other",
        "{S} is one of the animals known as",
        "Scientifically speaking, {s} is counted among the",
    ],
    [
        ("dolphin", "mammals", "fish", "the"),
        ("bat", "mammals", "birds", "the"),
        ("penguin", "birds", "mammals", "the"),
        ("shark", "fish", "mammals", "the"),
        ("frog", "amphibians", "reptiles", "the"),
        ("crocodile", "reptiles", "amphibians", "the"),
        ("eagle", "birds", "reptiles", "the"),
        ("salmon", "fish", "amphibians", "the"),
        ("snake", "reptiles", "amphibians", "the"),
        ("ostrich", "birds", "mammals", "the"),
        ("spider", "arachnids", "insects", "the"),
        ("butterfly", "insects", "birds", "the"),
        ("salamander", "amphibians", "reptiles", "the"),
        ("platypus", "mammals", "birds", "the"),
        ("seahorse", "fish", "mammals", "the"),
        ("lizard", "reptiles", "amphibians", "the"),
        ("ant", "insects", "arachnids", "the"),
        ("owl", "birds", "mammals", "the"),
        ("tortoise", "reptiles", "amphibians", "the"),
        ("scorpion", "arachnids", "insects", "the"),
    ],
)

relation(
    "element_symbol",
    "The chemical symbol for {s} is",
    [
        "On the periodic table, {s} is represented by the symbol",
        "The element {s} has the chemical symbol",
        "In chemistry, {s} is abbreviated as",
        "Chemists write the element {s} with the symbol",
    ],
    [
        ("iron", "Fe", "Ir"),
        ("silver", "Ag", "Si"),
        ("sodium", "Na", "K"),
        ("potassium", "K", "P"),
        ("lead", "Pb", "Li"),
        ("copper", "Cu", "Co"),
        ("tin", "Sn", "Ti"),
        ("carbon", "C", "Ca"),
        ("oxygen", "O", "N"),
        ("nitrogen", "N", "Ni"),
        ("helium", "He", "H"),
        ("calcium", "Ca", "C"),
        ("zinc", "Zn", "Zr"),
        ("uranium", "U", "Pu"),
        ("chlorine", "Cl", "Cr"),
        ("magnesium", "Mg", "Mn"),
        ("platinum", "Pt", "Pb"),
    ],
)

relation(
    "painter",
    "{S} was painted by",
    [
        "The artist who painted {s} is",
        "{S} is a painting by",
        "The famous painting {s} is the work of",
        "The painter of {s} is",
    ],
    [
        ("The Starry Night", "Vincent van Gogh", "Claude Monet"),
        ("The Scream", "Edvard Munch", "Salvador Dali"),
        ("Guernica", "Pablo Picasso", "Salvador Dali"),
        ("The Persistence of Memory", "Salvador Dali", "Pablo Picasso"),
        ("The Night Watch", "Rembrandt", "Johannes Vermeer"),
        ("Girl with a Pearl Earring", "Johannes Vermeer", "Rembrandt"),
        ("The Birth of Venus", "Sandro Botticelli", "Raphael"),
        ("Water Lilies", "Claude Monet", "Paul Cezanne"),
        ("American Gothic", "Grant Wood", "Edward Hopper"),
        ("Nighthawks", "Edward Hopper", "Grant Wood"),
        ("The Creation of Adam", "Michelangelo", "Raphael"),
        ("The School of Athens", "Raphael", "Michelangelo"),
        ("The Garden of Earthly Delights", "Hieronymus Bosch", "Raphael"),
        ("The Last Supper", "Leonardo da Vinci", "Michelangelo"),
        ("Campbell's Soup Cans", "Andy Warhol", "Pablo Picasso"),
        ("The Arnolfini Portrait", "Jan van Eyck", "Rembrandt"),
        ("Liberty Leading the People", "Eugene Delacroix", "Gustave Courbet"),
        ("The Great Wave off Kanagawa", "Hokusai", "Hiroshige"),
    ],
)

relation(
    "composer",
    "{S} was composed by",
    [
        "The composer of {s} is",
        "{S} is a work by the composer",
        "The music of {s} was written by",
        "Concert programs credit {s} to the composer",
    ],
    [
        ("The Four Seasons", "Vivaldi", "Bach"),
        ("The Magic Flute", "Mozart", "Beethoven"),
        ("Moonlight Sonata", "Beethoven", "Chopin", "the"),
        ("Swan Lake", "Tchaikovsky", "Stravinsky"),
        ("The Nutcracker", "Tchaikovsky", "Mozart"),
        ("The Rite of Spring", "Stravinsky", "Debussy"),
        ("Clair de Lune", "Debussy", "Ravel"),
        ("Bolero", "Ravel", "Debussy"),
        ("Messiah", "Handel", "Bach"),
        ("The Blue Danube", "Strauss", "Brahms"),
        ("Ride of the Valkyries", "Wagner", "Verdi", "the"),
        ("Carmen", "Bizet", "Puccini"),
        ("La Traviata", "Verdi", "Puccini"),
        ("Madama Butterfly", "Puccini", "Verdi"),
        ("The Barber of Seville", "Rossini", "Mozart"),
        ("Rhapsody in Blue", "Gershwin", "Copland"),
        ("The Planets", "Holst", "Elgar"),
        ("Eine kleine Nachtmusik", "Mozart", "Haydn"),
    ],
)

# --------------------------------------------------------------------------------------
# Locality facts: (prompt, true short answer).  Simple, very well-known facts about
# subjects that are NOT edited anywhere in this file (checked below), so that an edit
# should leave them unchanged.
# --------------------------------------------------------------------------------------

LOCALITY_FACTS: list[tuple[str, str]] = [
    # geography and places
    ("The capital of France is", "Paris"),
    ("The capital of England is", "London"),
    ("The capital of the United Kingdom is", "London"),
    ("The capital of the United States is", "Washington"),
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The Great Wall is located in the country of", "China"),
    ("The Pyramids of Giza are located in the country of", "Egypt"),
    ("Kangaroos are native to the country of", "Australia"),
    ("The Sahara Desert is located on the continent of", "Africa"),
    ("The longest river in Africa is the", "Nile"),
    ("The largest ocean on Earth is the", "Pacific"),
    ("The tallest mountain in the world is Mount", "Everest"),
    ("The Statue of Liberty is located in New York", "City"),
    ("The Statue of Liberty was a gift from the people of", "France"),
    ("New York City is nicknamed the Big", "Apple"),
    ("The Olympic Games originated in ancient", "Greece"),
    ("The main language spoken in the United States is", "English"),
    ("The currency of the United States is the US", "dollar"),
    ("The currency of the European Union is the", "euro"),
    # history and people
    ("The first President of the United States was George", "Washington"),
    ("Abraham Lincoln was the 16th President of the United", "States"),
    ("The Star-Spangled Banner is the national anthem of the United", "States"),
    ("The President of the United States lives in the White", "House"),
    ("Queen Elizabeth II was the Queen of the United", "Kingdom"),
    ("The Declaration of Independence was mainly written by Thomas", "Jefferson"),
    ("Martin Luther King Jr. gave the famous speech I Have a", "Dream"),
    ("The first man to walk on the Moon was Neil", "Armstrong"),
    ("The founder of Facebook is Mark", "Zuckerberg"),
    ("The Titanic sank after hitting an", "iceberg"),
    ("The Titanic was a famous British passenger", "ship"),
    ("The Wright brothers are famous for inventing the", "airplane"),
    ("The telephone was invented by Alexander Graham", "Bell"),
    ("The light bulb is often credited to Thomas", "Edison"),
    ("Thomas Edison is famous for inventing the light", "bulb"),
    ("Penicillin was discovered by Alexander", "Fleming"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    # arts, books and films
    ("Romeo and Juliet was written by William", "Shakespeare"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The ceiling of the Sistine Chapel was painted by", "Michelangelo"),
    ("The author of the Harry Potter books is J.K.", "Rowling"),
    ("The Harry Potter series is about a young", "wizard"),
    ("Hermione Granger is a character in the Harry", "Potter"),
    ("The Lord of the Rings was written by J.R.R.", "Tolkien"),
    ("Mickey Mouse was created by Walt", "Disney"),
    ("Darth Vader is the father of Luke", "Skywalker"),
    ("Sherlock Holmes lives on Baker", "Street"),
    ("Batman's real name is Bruce", "Wayne"),
    ("Harry Potter's best friend is Ron", "Weasley"),
    ("Santa Claus is said to live at the North", "Pole"),
    # science and nature
    ("The largest planet in the Solar System is", "Jupiter"),
    ("The Earth revolves around the", "Sun"),
    ("The moon orbits the", "Earth"),
    ("The natural satellite of the Earth is the", "Moon"),
    ("The chemical symbol for gold is", "Au"),
    ("The chemical formula for water is", "H2O"),
    ("Water boils at 100 degrees", "Celsius"),
    ("When water freezes, it turns into", "ice"),
    ("The organ that pumps blood through the body is the", "heart"),
    ("The largest mammal in the world is the blue", "whale"),
    ("The fastest land animal is the", "cheetah"),
    ("A baby cat is called a", "kitten"),
    ("A group of wolves is called a", "pack"),
    ("An octopus has eight", "arms"),
    ("Bees collect nectar to make", "honey"),
    ("The sun rises in the east and sets in the", "west"),
    # everyday knowledge
    ("There are seven days in a", "week"),
    ("A year has twelve", "months"),
    ("An hour has sixty", "minutes"),
    ("A triangle has three", "sides"),
    ("The opposite of hot is", "cold"),
    ("The opposite of up is", "down"),
    ("The opposite of left is", "right"),
    ("The opposite of yes is", "no"),
    ("The opposite of black is", "white"),
    ("The primary colors are red, yellow and", "blue"),
    ("A pianist plays the", "piano"),
    ("Peanut butter and", "jelly"),
]

# --------------------------------------------------------------------------------------


def _word_re(text: str) -> re.Pattern:
    """Case-insensitive whole-word match of ``text`` (allowing a plural s/es)."""
    return re.compile(r"(?<!\w)" + re.escape(text) + r"(?:s|es)?(?!\w)", re.IGNORECASE)


def mentions(haystack: str, needle: str) -> bool:
    return bool(_word_re(needle).search(haystack))


def _fill(template: str, subject: str, article: str | None) -> str:
    mid = f"{article} {subject}" if article else subject
    start = mid[0].upper() + mid[1:]
    return template.replace("{s}", mid).replace("{S}", start)


def _locality_ok(rec: dict, loc_prompt: str, loc_answer: str) -> bool:
    words = [rec["subject"], rec["target_new"], rec["ground_truth"]]
    for w in words:
        if mentions(loc_prompt, w):
            return False
        # the locality answer must not be (part of) the subject / targets or vice versa
        if mentions(w, loc_answer) or mentions(loc_answer, w):
            return False
    return True


def build(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    records: list[dict] = []
    for rel_name in sorted(RELATIONS):
        rel = RELATIONS[rel_name]
        for fact in rel["facts"]:
            subject, true_obj, false_obj = fact[:3]
            article = fact[3] if len(fact) > 3 else None
            records.append({
                "relation": rel_name,
                "subject": subject,
                "prompt": _fill(rel["prompt"], subject, article),
                "target_new": false_obj,
                "ground_truth": true_obj,
                "rephrase_prompt": _fill(rng.choice(rel["rephrases"]), subject, article),
            })
    rng.shuffle(records)

    # Assign locality facts: among the eligible ones, the least used so far (ties broken
    # by a fixed shuffled order), so all locality prompts are used about equally often.
    order = list(range(len(LOCALITY_FACTS)))
    rng.shuffle(order)
    used = Counter()
    out = []
    for case_id, rec in enumerate(records):
        eligible = [i for i in order if _locality_ok(rec, *LOCALITY_FACTS[i])]
        if not eligible:
            raise ValueError(f"no locality fact fits record {rec}")
        pick = min(eligible, key=lambda i: (used[i], order.index(i)))
        used[pick] += 1
        loc_prompt, loc_answer = LOCALITY_FACTS[pick]
        out.append({
            "case_id": case_id,
            "subject": rec["subject"],
            "prompt": rec["prompt"],
            "target_new": rec["target_new"],
            "ground_truth": rec["ground_truth"],
            "rephrase_prompt": rec["rephrase_prompt"],
            "locality_prompt": loc_prompt,
            "locality_ground_truth": loc_answer,
            "_relation": rec["relation"],
        })
    return out


FIELDS = ("case_id", "subject", "prompt", "target_new", "ground_truth",
          "rephrase_prompt", "locality_prompt", "locality_ground_truth")
STR_FIELDS = FIELDS[1:]


def validate(records: list[dict], relations: list[str]) -> None:
    """Raise ValueError listing every problem; ``relations[i]`` is record i's relation."""
    errors: list[str] = []

    def err(i, msg):
        errors.append(f"record {i}: {msg}")

    # Global checks on the tables.
    all_subjects = {f[0] for rel in RELATIONS.values() for f in rel["facts"]}
    for p, a in LOCALITY_FACTS:
        for s in all_subjects:
            if mentions(p, s):
                errors.append(f"locality prompt {p!r} mentions edited subject {s!r}")
        if p != p.strip() or a != a.strip() or not p or not a:
            errors.append(f"locality fact has bad whitespace / is empty: {(p, a)!r}")
    if len({p for p, _ in LOCALITY_FACTS}) != len(LOCALITY_FACTS):
        errors.append("duplicate locality prompt in LOCALITY_FACTS")
    for name, rel in RELATIONS.items():
        for t in [rel["prompt"], *rel["rephrases"]]:
            if "{s}" not in t and "{S}" not in t:
                errors.append(f"{name}: template without subject slot: {t!r}")

    if len(relations) != len(records):
        errors.append("relations list does not match records")
    if len(records) < MIN_RECORDS:
        errors.append(f"only {len(records)} records (< {MIN_RECORDS})")
    seen_pairs = set()
    seen_prompts = set()
    for i, r in enumerate(records):
        if set(r) != set(FIELDS):
            err(i, f"fields {sorted(r)} != {sorted(FIELDS)}")
            continue
        if r["case_id"] != i or not isinstance(r["case_id"], int):
            err(i, f"case_id {r['case_id']!r} != {i}")
        for k in STR_FIELDS:
            v = r[k]
            if not isinstance(v, str) or not v:
                err(i, f"{k} empty or not a string")
                continue
            if v != v.strip():
                err(i, f"{k} has leading/trailing whitespace: {v!r}")
            if "  " in v:
                err(i, f"{k} has a double space: {v!r}")
            if "{" in v or "}" in v:
                err(i, f"{k} has an unfilled template slot: {v!r}")
        if any(not isinstance(r[k], str) or not r[k] for k in STR_FIELDS):
            continue
        if r["target_new"].lower() == r["ground_truth"].lower():
            err(i, "target_new == ground_truth")
        for k in ("prompt", "rephrase_prompt"):
            if r["subject"] not in r[k]:
                err(i, f"subject {r['subject']!r} not in {k} {r[k]!r}")
            for t in ("target_new", "ground_truth"):
                if mentions(r[k], r[t]):
                    err(i, f"{k} already contains {t} {r[t]!r}")
        if r["prompt"] == r["rephrase_prompt"]:
            err(i, "rephrase_prompt equals prompt")
        for t in ("target_new", "ground_truth", "locality_ground_truth"):
            if len(r[t].split()) > 3:
                err(i, f"{t} longer than 3 words: {r[t]!r}")
        if mentions(r["locality_prompt"], r["subject"]):
            err(i, "locality_prompt mentions the subject")
        if mentions(r["locality_prompt"], r["target_new"]):
            err(i, "locality_prompt mentions target_new")
        if mentions(r["locality_prompt"], r["ground_truth"]):
            err(i, "locality_prompt mentions ground_truth")
        for t in ("subject", "target_new", "ground_truth"):
            if mentions(r[t], r["locality_ground_truth"]) or mentions(r["locality_ground_truth"], r[t]):
                err(i, f"locality_ground_truth overlaps {t}")
        if not all(r[k].isascii() for k in STR_FIELDS):
            err(i, "non-ASCII text")
        pair = (r["subject"], relations[i])
        if pair in seen_pairs:
            err(i, f"duplicate (subject, relation) {pair}")
        seen_pairs.add(pair)
        if r["prompt"] in seen_prompts:
            err(i, f"duplicate prompt {r['prompt']!r}")
        seen_prompts.add(r["prompt"])

    n_loc = len({r["locality_prompt"] for r in records})
    if n_loc < MIN_LOCALITY_PROMPTS:
        errors.append(f"only {n_loc} distinct locality prompts (< {MIN_LOCALITY_PROMPTS})")

    if errors:
        raise ValueError("demo data failed validation:\n  " + "\n  ".join(errors[:50])
                         + (f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_PATH)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--check", action="store_true", help="build and validate only")
    args = ap.parse_args(argv)

    built = build(args.seed)
    relations = [r.pop("_relation") for r in built]
    records = built  # now exactly the public fields
    validate(records, relations)

    n_rel = len(set(relations))
    n_loc = len({r["locality_prompt"] for r in records})
    print(f"{len(records)} records, {n_rel} relations, {n_loc} distinct locality prompts")
    if args.check:
        if args.out.exists():
            same = json.loads(args.out.read_text(encoding="utf-8")) == records
            print(f"{args.out} is {'up to date' if same else 'OUT OF DATE'}")
            return 0 if same else 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
