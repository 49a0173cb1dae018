"""The engine inputs' layout, shared by the builder's graph check (:mod:`qvggt_export.engine.build`) and the
runtime's tensor check (:mod:`qvggt_export.engine.runtime`): ``images`` [1, S, 3, H, W] (S dynamic, H and W
fixed per engine) and, in tracking engines, ``query_points`` [1, N, 2] (N dynamic)."""

IMAGE_RANK = 5
BATCH_AXIS, FRAME_AXIS, CHANNEL_AXIS, HEIGHT_AXIS, WIDTH_AXIS = range(IMAGE_RANK)
CHANNELS = 3
POINTS_INPUT = "query_points"
POINTS_RANK = 3
POINTS_AXIS = 1
