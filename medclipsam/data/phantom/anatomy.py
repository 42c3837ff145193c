"""The phantom's anatomy: body wall, gut, muscles, organs, vessels and bone, drawn in anatomical positions mapped
to world mm by a `Layout`, in an order where later structures carve earlier ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .canvas import LONG, Blob, Box, Canvas, Within, paint_blob, paint_tube
from .layout import Layout


def draw_anatomy(canvas: Canvas, layout: Layout, ids: dict[str, int], surroundings: Surroundings) -> None:
    """Body, then what lies around it (`surroundings`: table, arms), then gut, muscles, organs, vessels and bone."""
    body = _draw_body(canvas, layout)
    surroundings(canvas, layout, body)
    _draw_bowel(canvas, layout, body.cavity)
    _draw_colon(canvas, layout, body.cavity)
    _draw_lung_bases(canvas, layout, body.cavity)
    _draw_back_muscles(canvas, layout, body.deep)
    _draw_organs(canvas, layout, ids, body.cavity)
    _draw_vessels(canvas, layout, ids)
    _draw_spine(canvas, layout)
    _draw_ribs(canvas, layout, body)


@dataclass(frozen=True)
class BodyRegions:
    """In-plane masks of the body (constant along z): everything, under the fat, and the abdominal cavity."""

    body_plane: np.ndarray
    deep_plane: np.ndarray
    cavity_plane: np.ndarray
    depth_plane: np.ndarray  # approximate depth under the skin, mm
    fat_mm: float
    wall_mm: float
    outline: Blob  # the skin surface

    def deep(self, box: Box) -> np.ndarray:
        """Mask over `box` of the part under the subcutaneous fat."""
        return self.deep_plane[box[0], box[1], :]

    def cavity(self, box: Box) -> np.ndarray:
        """Mask over `box` of the abdominal cavity inside the muscular wall."""
        return self.cavity_plane[box[0], box[1], :]


Surroundings = Callable[[Canvas, Layout, BodyRegions], None]  # draws what lies around the body (table, arms)


def _draw_body(canvas: Canvas, layout: Layout) -> BodyRegions:
    """Skin outline with subcutaneous fat (thicker in larger bodies), a muscular wall and fat inside."""
    core = layout.blob((0.0, 0.0, 0.0), (150.0, 110.0, LONG), jitter_mm=0.0, size_var=0.0, wobble=0.02)
    fat = 8.0 + 16.0 * (layout.body_axes[0] - 138.0) / 27.0 + layout.rng.uniform(0.0, 6.0)
    wall = layout.rng.uniform(8.0, 13.0)
    body, fat = core.resized(layout.extra_fat_mm), fat + layout.extra_fat_mm
    plane = canvas.plane()
    depth = (1.0 - body.radius(canvas, plane)) * float(body.axes[:2].mean())
    regions = BodyRegions(body.inside(canvas, plane), body.resized(-fat).inside(canvas, plane),
                          body.resized(-fat - wall).inside(canvas, plane), depth, fat, wall, body)
    canvas.paint(plane, regions.body_plane, layout.hu(-100, 6))
    canvas.paint(plane, regions.deep_plane, layout.hu(50, 4))
    canvas.paint(plane, regions.cavity_plane, layout.hu(-95, 5))
    canvas.extrude_first_plane()
    return regions


def _draw_bowel(canvas: Canvas, layout: Layout, cavity: Within) -> None:
    """Small-bowel loops crowding the mid and lower cavity: enhancing wall around fluid, air or chyme."""
    rng = layout.rng
    wall_hu = layout.enhanced("bowel wall", 5)
    contents = {"fluid": (15.0, 0.55), "air": (-950.0, 0.15), "chyme": (-150.0, 0.3)}
    kinds = list(contents)
    weights = [w for _, w in contents.values()]
    for _ in range(90):
        x, y = rng.uniform(-110, 110), rng.uniform(-20, 85)
        z = -120.0 + 150.0 * rng.beta(1.0, 1.5)
        radius = rng.uniform(10, 16)
        loop = layout.blob((x, y, z), (radius, radius * rng.uniform(0.7, 1.4), radius * rng.uniform(1.0, 2.0)),
                           angles_deg=(0, 0, rng.uniform(0, 180)), jitter_mm=0.0, wobble=0.12)
        kind = kinds[rng.choice(len(kinds), p=weights)]
        paint_blob(canvas, loop, wall_hu, within=cavity)
        paint_blob(canvas, loop.resized(-2.5), layout.hu(contents[kind][0], 10), within=cavity)


def _draw_colon(canvas: Canvas, layout: Layout, cavity: Within) -> None:
    """Ascending, transverse and descending colon along the flanks and front, holding air and mottled faeces."""
    path = layout.curve([(95.0, -5.0, -130.0), (90.0, 0.0, -15.0), (60.0, 45.0, -20.0), (0.0, 62.0, -35.0),
                           (-60.0, 45.0, 5.0), (-92.0, 5.0, 15.0), (-92.0, -5.0, -130.0)], step_mm=6.0, jitter_mm=5.0)
    radius = layout.rng.uniform(17.0, 23.0)
    wall_hu = layout.enhanced("colon wall", 5)
    paint_tube(canvas, path, np.array([radius, radius, radius]) * layout.scale, wall_hu, within=cavity)
    for point in path:
        content = -950.0 if layout.rng.uniform() < 0.45 else layout.hu(-200, 60)
        lumen = np.array([radius - 3.0] * 3) * layout.scale * layout.rng.uniform(0.8, 1.0)
        paint_tube(canvas, point[None], lumen, content, within=cavity)


def _draw_lung_bases(canvas: Canvas, layout: Layout, cavity: Within) -> None:
    """Both lung bases behind and around the diaphragm domes in the top slices (liver and spleen carve them)."""
    for side in (1.0, -1.0):
        lung = layout.blob((side * 72.0, -30.0, 165.0), (78.0, 72.0, 85.0), jitter_mm=6.0, size_var=0.05,
                           wobble=0.04)
        paint_blob(canvas, lung, layout.hu(-860, 15), within=cavity)


def _draw_back_muscles(canvas: Canvas, layout: Layout, deep: Within) -> None:
    """Paraspinal muscles behind the spine (under the fat) and psoas muscles growing beside it towards the pelvis."""
    muscle = layout.hu(50, 4)
    for side in (1.0, -1.0):
        erector = layout.blob((side * 34.0, -82.0, 0.0), (26.0, 20.0, LONG), jitter_mm=2.0, size_var=0.1,
                              wobble=0.05)
        paint_blob(canvas, erector, muscle, within=deep)
        path = layout.curve([(side * 28.0, -42.0, 30.0), (side * 40.0, -38.0, -60.0), (side * 50.0, -30.0, -130.0)],
                      step_mm=4.0, jitter_mm=2.0)
        grow = np.clip((30.0 - path[:, 2]) / 130.0, 0.0, 1.0)[:, None]
        radii = np.array([4.0, 4.0, 6.0]) + grow * np.array([18.0, 15.0, 0.0])
        paint_tube(canvas, path, radii * layout.in_plane, muscle)


def _draw_organs(canvas: Canvas, layout: Layout, ids: dict[str, int], cavity: Within) -> None:
    """Solid and hollow organs with their labels, kept inside the abdominal cavity."""
    liver_hu = layout.enhanced("liver", 4)
    for lobe in (layout.blob((62.0, 2.0, 40.0), (60.0, 76.0, 62.0), angles_deg=(0, 0, -10)),
                 layout.blob((8.0, 48.0, 55.0), (50.0, 30.0, 32.0), angles_deg=(0, 0, 15), jitter_mm=5.0),
                 layout.blob((20.0, 5.0, 45.0), (22.0, 24.0, 34.0), jitter_mm=3.0, size_var=0.1)):  # caudate
        paint_blob(canvas, lobe, liver_hu, ids["liver"], within=cavity)
    _draw_liver_vessels(canvas, layout, ids["liver"])

    gallbladder = layout.blob((48.0, 42.0, -8.0), (14.0, 16.0, 30.0), angles_deg=(20, 0, 20), jitter_mm=5.0)
    paint_blob(canvas, gallbladder, layout.hu(12, 4), ids["gallbladder"], within=cavity)

    spleen = layout.blob((-74.0, -34.0, 45.0), (20.0, 48.0, 46.0), angles_deg=(0, 0, 40), jitter_mm=5.0)
    paint_blob(canvas, spleen, layout.enhanced("spleen", 4), ids["spleen"], within=cavity)

    _draw_stomach(canvas, layout, ids["stomach"], cavity)

    pancreas = layout.curve([(24.0, 8.0, -20.0), (0.0, 22.0, -10.0), (-35.0, 15.0, 0.0), (-70.0, -12.0, 12.0)],
                      step_mm=3.0, jitter_mm=4.0)
    along = np.linspace(0.0, 1.0, len(pancreas))[:, None]
    radii = (np.array([16.0, 15.0, 16.0]) * (1 - along) + np.array([10.0, 9.0, 10.0]) * along) \
        * layout.rng.uniform(0.9, 1.1)
    paint_tube(canvas, pancreas, radii * layout.scale, layout.enhanced("pancreas", 4), ids["pancreas"], within=cavity)

    cortex = layout.enhanced("kidney cortex", 5)
    medulla = layout.enhanced("kidney medulla", 5)
    for side, name, z in ((1.0, "right kidney", -25.0), (-1.0, "left kidney", -12.0)):
        kidney = layout.blob((side * 62.0, -30.0, z), (25.0, 21.0, 52.0), angles_deg=(0, side * 12, side * 30),
                             jitter_mm=6.0, wobble=0.05)
        paint_blob(canvas, kidney, cortex, ids[name], within=cavity)
        paint_blob(canvas, kidney, medulla, ids[name], scale=0.62, within=cavity)


def _draw_liver_vessels(canvas: Canvas, layout: Layout, liver: int) -> None:
    """Hepatic veins fanning out from the IVC and portal vein branches from the hilum, drawn inside the liver only."""
    def in_liver(box: Box) -> np.ndarray:
        return canvas.label[box] == liver

    hepatic_hu, portal_hu = layout.enhanced("hepatic veins", 6), layout.enhanced("portal veins", 6)
    for tip in ((95.0, 10.0, 45.0), (45.0, 55.0, 40.0), (-15.0, 50.0, 62.0)):
        vein = layout.curve([(24.0, -14.0, 85.0), tip], step_mm=3.0, jitter_mm=4.0)
        radii = np.linspace(6.0, 2.5, len(vein))[:, None] * np.ones(3) * layout.scale
        paint_tube(canvas, vein, radii, hepatic_hu, liver, within=in_liver)
    for tip in ((95.0, -5.0, 20.0), (15.0, 45.0, 40.0)):
        branch = layout.curve([(30.0, 5.0, 5.0), (50.0, 10.0, 20.0), tip], step_mm=3.0, jitter_mm=4.0)
        radii = np.linspace(7.0, 3.0, len(branch))[:, None] * np.ones(3) * layout.scale
        paint_tube(canvas, branch, radii, portal_hu, liver, within=in_liver)


def _draw_stomach(canvas: Canvas, layout: Layout, label: int, cavity: Within) -> None:
    """Stomach (fundus/body and antrum): enhancing wall, fluid content and, often, an anterior air pocket."""
    parts = [layout.blob((-52.0, 18.0, 48.0), (38.0, 34.0, 44.0), angles_deg=(0, 0, -20), jitter_mm=6.0),
             layout.blob((-12.0, 52.0, 8.0), (38.0, 18.0, 22.0), angles_deg=(0, 0, -25), jitter_mm=5.0)]
    wall = layout.enhanced("stomach wall", 5)
    fluid = layout.hu(12, 5)
    level = layout.rng.uniform(5.0, 45.0) * layout.scale[1] + layout.shift[1]  # supine: air rises anteriorly
    has_air = layout.rng.uniform() < 0.65

    def above_level(box: Box) -> np.ndarray:
        return cavity(box) & (canvas.coords(box)[1] > level)

    for part in parts:
        paint_blob(canvas, part, wall, label, within=cavity)
    for part in parts:
        lumen = part.resized(-4.0)
        paint_blob(canvas, lumen, fluid, label, within=cavity)
        if has_air:
            paint_blob(canvas, lumen, -980.0, label, within=above_level)


def _draw_vessels(canvas: Canvas, layout: Layout, ids: dict[str, int]) -> None:
    """Aorta and IVC down to their bifurcations, then unlabelled common iliac vessels."""
    top, bottom = max(layout.z_top / layout.scale[2], 100.0), min(layout.z_bottom / layout.scale[2], -110.0)
    bifurcation = layout.rng.uniform(-66.0, -54.0)
    aorta_hu, ivc_hu = layout.enhanced("aorta", 6), layout.enhanced("ivc", 6)
    r_aorta = layout.rng.uniform(9.5, 12.5)
    aorta = layout.curve([(-10.0, -18.0, top), (-12.0, -12.0, bifurcation)], 3.0, 2.0)
    paint_tube(canvas, aorta, np.array([r_aorta, r_aorta, 4.0]) * layout.in_plane, aorta_hu, ids["aorta"])
    ivc = layout.curve([(22.0, -18.0, top), (18.0, -20.0, bifurcation - 6.0)], 3.0, 2.0)
    paint_tube(canvas, ivc, np.array([13.0, 10.0, 4.0]) * layout.in_plane, ivc_hu, ids["inferior vena cava"])
    for side in (1.0, -1.0):
        artery = layout.curve([(-12.0, -12.0, bifurcation + 3), (side * 45.0, 0.0, bottom)], 3.0, 1.0)
        paint_tube(canvas, artery, np.array([7.0, 7.0, 4.0]) * layout.in_plane, aorta_hu)
        vein = layout.curve([(18.0, -20.0, bifurcation - 3), (side * 40.0, -22.0, bottom)], 3.0, 1.0)
        paint_tube(canvas, vein, np.array([9.0, 8.0, 4.0]) * layout.in_plane, ivc_hu)


def _draw_spine(canvas: Canvas, layout: Layout) -> None:
    """Lumbar vertebrae: cortical shell, cancellous body, discs, neural arch with canal and spinous process."""
    rng = layout.rng
    cortical, cancellous = layout.hu(700, 40), layout.hu(230, 20)
    disc_hu, canal_hu = layout.hu(85, 6), layout.hu(20, 5)
    vertebra = layout.blob((0.0, -50.0, 0.0), (21.0, 17.0, LONG), jitter_mm=1.5, size_var=0.08, wobble=0.02)
    arch = layout.blob((0.0, -76.0, 0.0), (14.0, 13.0, LONG), jitter_mm=1.0, size_var=0.08, wobble=0.02)
    spinous = layout.blob((0.0, -93.0, 0.0), (4.5, 13.0, LONG), jitter_mm=1.0, size_var=0.1, wobble=0.02)
    paint_blob(canvas, arch, cortical * 0.8)
    paint_blob(canvas, spinous, cortical * 0.8)
    paint_blob(canvas, arch.resized(-5.5), canal_hu)
    paint_blob(canvas, vertebra, cortical)
    paint_blob(canvas, vertebra.resized(-3.0), cancellous)
    period, disc = rng.uniform(33.0, 37.0), rng.uniform(7.0, 10.0)
    start = rng.uniform(0.0, period)

    def in_disc(box: Box) -> np.ndarray:
        return np.mod(canvas.coords(box)[2] - start, period) < disc

    paint_blob(canvas, vertebra.resized(0.5), disc_hu, within=in_disc)


def _draw_ribs(canvas: Canvas, layout: Layout, body: BodyRegions) -> None:
    """Lower ribs cut obliquely: oval bony arcs (cortex around marrow) in the muscular wall, running down and
    forwards from beside the spine, so each slice shows a few short arcs."""
    rng = layout.rng
    whole = canvas.whole()
    x, y, z = canvas.coords(whole)
    centre = layout.shift
    from_back = np.abs(np.angle(np.exp(1j * (np.arctan2(y - centre[1], x - centre[0]) + np.pi / 2))))
    along = (from_back > 0.35) & (from_back < 2.2)  # radians from the posterior midline
    period, height, thickness = rng.uniform(28.0, 34.0), rng.uniform(9.0, 12.0), min(9.0, body.wall_mm)
    offset = np.mod(z + 40.0 * from_back - rng.uniform(0.0, period), period) - height / 2
    radial = body.depth_plane - (body.fat_mm + body.wall_mm / 2)
    oval = (offset / (height / 2)) ** 2 + (radial / (thickness / 2)) ** 2
    rib = along & (z > rng.uniform(-30.0, -10.0) + 30.0 * from_back)
    canvas.paint(whole, rib & (oval < 1.0), layout.hu(650, 40))
    canvas.paint(whole, rib & (oval < 0.35), layout.hu(250, 30))

