"""The README and the results files cannot drift apart.

The measured tables live in results/*.md, each with its command and conditions; the README keeps
a few headline numbers, each next to a link to the file it comes from. Convention:

  * A *unit* of the README is a paragraph (lines between blank lines; fenced code blocks are
    skipped whole). A unit that links one or more `results/*.md` files is a headline unit.
  * Every number a headline unit quotes must occur verbatim in one of the results files that
    unit links. Numbers are: decimals (1.683, 1.8e-6), factors (1.72x, 98x), percentages (93%)
    and wall times (8 min 26 s, 11m45s); a value with a spread, "0.358 ± 0.002", must occur as
    that whole string. Plain integers (layers, seeds, iterations) are not checked, nor is text
    inside `inline code` (flags, commands).
  * So: write a headline number on the paragraph that holds its link, copied from the file.
    A number quoted with no results link in its paragraph is not checked -- don't do that.

Also: every `results/...` path the README names exists; the generated study table
(results/study_cpu.md) and its plots are linked; the functions and files the reading path
("Read the code in this order") names exist in the code.
"""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUMBER = re.compile(
    r'\d+ ?min \d+ ?s'                      # wall times: 8 min 26 s
    r'|\d+m\d+s'                            # ... 11m45s
    r'|\d+(?:\.\d+)?[x%](?![A-Za-z0-9])'     # factors and percentages: 1.72x, 98x, 93%
    r'|\d+\.\d+(?:e[-+]?\d+)?'              # decimals: 1.683, 1.8e-6
)
WITH_SPREAD = re.compile(r'\d+\.\d+ ± \d+\.\d+')
RESULTS_LINK = re.compile(r'\]\((results/[^)\s]+)\)')
RESULTS_PATH = re.compile(r'results/[\w./-]*\w')


def read(*parts):
    with open(os.path.join(REPO, *parts), encoding='utf-8') as f:
        return f.read()


def units(markdown):
    """Paragraphs of a markdown text, fenced code blocks dropped."""
    out, current, fenced = [], [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith('```'):
            fenced = not fenced
            if current:
                out.append('\n'.join(current))
                current = []
            continue
        if fenced:
            continue
        if line.strip():
            current.append(line)
        elif current:
            out.append('\n'.join(current))
            current = []
    if current:
        out.append('\n'.join(current))
    return out


def quoted_numbers(unit):
    """The numbers a unit quotes (see the module docstring): outside inline code and link targets."""
    text = re.sub(r'`[^`]*`', ' ', unit)
    text = re.sub(r'\]\([^)]*\)', ']', text)
    return WITH_SPREAD.findall(text), NUMBER.findall(WITH_SPREAD.sub(' ', text))


def occurs(number, text):
    """number occurs in text as a whole number (0.51 is not in 0.514, nor 1.01 in 0.01)."""
    return re.search(r'(?<![\d.])' + re.escape(number) + r'(?![\d])', text) is not None


def headline_problems(readme):
    problems = []
    for unit in units(readme):
        links = sorted({p for p in RESULTS_LINK.findall(unit) if p.endswith('.md')})
        if not links:
            continue
        sources = [read(*p.split('/')) for p in links
                   if os.path.isfile(os.path.join(REPO, p))]
        spreads, numbers = quoted_numbers(unit)
        for n in spreads + numbers:
            if not any(occurs(n, s) for s in sources):
                first = unit.splitlines()[0][:60]
                problems.append(f"{n!r} (paragraph '{first}...') is in none of {links}")
    return problems


def test_every_results_path_the_readme_names_exists():
    readme = read('README.md')
    paths = set(RESULTS_PATH.findall(readme))
    assert paths, "the README links no results files"
    missing = sorted(p for p in paths if not os.path.isfile(os.path.join(REPO, p)))
    assert not missing, f"README names results files that do not exist: {missing}"


def test_readme_headline_numbers_are_in_the_linked_results_files():
    readme = read('README.md')
    headline_units = [u for u in units(readme) if RESULTS_LINK.search(u)]
    assert len(headline_units) >= 5, "expected a headline with a results link per topic"
    problems = headline_problems(readme)
    assert not problems, "README numbers not found in the results file they link:\n" + \
        '\n'.join(problems)


def test_the_checker_catches_a_changed_number():
    """A headline number that is not in its file (or a spread that differs) is reported."""
    readme = read('README.md')
    assert not headline_problems(readme)
    for good, bad in [('98x', '97x'), ('1.8e-6', '1.9e-6'), ('0.358 ± 0.002', '0.358 ± 0.003'),
                      ('1.646', '1.647')]:
        assert good in readme, good
        assert headline_problems(readme.replace(good, bad)), f"{good} -> {bad} went unnoticed"


def test_readme_links_the_generated_study_results():
    readme = read('README.md')
    links = RESULTS_LINK.findall(readme)
    for name in ('study_cpu.md', 'study_cpu_size_curve_shakespeare_char.png',
                 'study_cpu_size_curve_counting.png', 'study_cpu_probes_shakespeare_char.png',
                 'study_cpu_probes_counting.png', 'study_quick.md'):
        assert f'results/{name}' in links, name
    assert 'python study.py --preset=cpu --results_dir=results' in readme


def definitions(path):
    """The functions, classes and module-level names a file defines."""
    text = read(path)
    return set(re.findall(r'^\s*(?:def|class) (\w+)', text, re.M)) | set(
        re.findall(r'^(\w+) = ', text, re.M))


def test_the_reading_path_names_code_that_exists():
    readme = read('README.md')
    section = readme.split('## Read the code in this order', 1)[1].split('\n## ', 1)[0]
    modules = {f[:-3] for f in os.listdir(REPO) if f.endswith('.py')}
    names = {f: definitions(f) for f in os.listdir(REPO) if f.endswith('.py')}
    every = set().union(*names.values())
    checked, missing = 0, []
    for token in re.findall(r'`([^`]+)`', section):
        if token.endswith('.py'):
            checked += 1
            if not os.path.isfile(os.path.join(REPO, token)):
                missing.append(token)
            continue
        if not re.fullmatch(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)?', token):
            continue
        checked += 1
        owner, _, name = token.rpartition('.')
        if owner in modules:                      # module.name
            ok = name in names[owner + '.py']
        elif owner:                               # Class.method: in the file defining Class
            ok = any(owner in d and name in d for d in names.values())
        else:
            ok = name in every
        if not ok:
            missing.append(token)
    assert checked >= 15, "the reading path should name files and functions"
    assert not missing, f"the reading path names code that does not exist: {missing}"
