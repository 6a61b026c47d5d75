"""The user docs stay true: every relative link resolves, the README's
config blocks build, the README stays short."""
import re
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

import agent_mm  # noqa: F401  (registers the backbones)

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = sorted([
    REPO / 'README.md', *REPO.glob('docs/**/*.md'),
    *REPO.glob('configs/**/README.md')
])
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
CODE_BLOCK = re.compile(r'```python\n(.*?)```', re.S)


def _relative_links(path: Path):
    for target in LINK.findall(path.read_text()):
        if not re.match(r'[a-z]+:', target) and not target.startswith('#'):
            yield target.split('#')[0]


def _heading_anchors(path: Path) -> set:
    """The anchors GitHub gives the headings of a markdown file (lower
    case, punctuation dropped, spaces as hyphens, ``-1``, ``-2``... on
    repeats), code blocks skipped."""
    anchors, seen, in_code = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith('```'):
            in_code = not in_code
        heading = None if in_code else re.match(r'#+ (.*)', line)
        if heading:
            slug = re.sub(r'[^\w\- ]', '', heading.group(1).strip().lower())
            slug = slug.replace(' ', '-')
            repeat = seen.get(slug, 0)
            seen[slug] = repeat + 1
            anchors.add(f'{slug}-{repeat}' if repeat else slug)
    return anchors


def _anchored_links(path: Path):
    """``(target file, anchor)`` of the links into a markdown file's
    heading, the file's own headings included."""
    for target in LINK.findall(path.read_text()):
        if re.match(r'[a-z]+:', target) or '#' not in target:
            continue
        name, anchor = target.split('#', 1)
        linked = path.parent / name if name else path
        if linked.suffix == '.md' and linked.exists():
            yield linked, anchor


@pytest.mark.parametrize(
    'path', MARKDOWN, ids=[str(p.relative_to(REPO)) for p in MARKDOWN])
def test_relative_links_resolve(path):
    missing = [
        target for target in _relative_links(path)
        if not (path.parent / target).exists()
    ]
    assert not missing, f'{path.relative_to(REPO)} links to missing files'


@pytest.mark.parametrize(
    'path', MARKDOWN, ids=[str(p.relative_to(REPO)) for p in MARKDOWN])
def test_links_to_headings_resolve(path):
    broken = [
        f'{linked.name}#{anchor}' for linked, anchor in _anchored_links(path)
        if anchor not in _heading_anchors(linked)
    ]
    assert not broken, f'{path.relative_to(REPO)} links to missing headings'


def test_readme_is_short():
    assert len((REPO / 'README.md').read_text().splitlines()) <= 300


README_CONFIGS = [
    block for block in CODE_BLOCK.findall((REPO / 'README.md').read_text())
    if '_base_' in block
]


@pytest.mark.parametrize('block', README_CONFIGS,
                         ids=[f'block{i}' for i in range(len(README_CONFIGS))])
def test_readme_config_blocks_build(tmp_path, block):
    path = tmp_path / 'readme_config.py'
    path.write_text(block)
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.init_cfg = None  # no checkpoint download or file
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    assert type(model.backbone).__name__.startswith('Agent')


def test_readme_has_config_blocks_and_pictures():
    text = (REPO / 'README.md').read_text()
    assert len(README_CONFIGS) >= 2
    pictures = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', text)
    assert len(pictures) >= 2
    for picture in pictures:
        assert (REPO / picture).is_file(), picture
