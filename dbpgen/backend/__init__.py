"""The back end: how each derived program runs, decided in one place and printed.

    Program --chooser.choose--> Lowered(kind, reason, entry Function, kernels)
            (lanes.lower | fused.lower | arrays.lower: Program -> schedule IR)
    schedule IR --schedule.verify--> checked --emit.function--> lines for templates/

`schedule` is the IR (frozen dataclasses), `common` what the lowerings share
(temporaries, hoisting, batch sums, freeing dead arrays), `chooser` every threshold,
`emit` the printing, `memory` the peak bytes of the schedule that runs.
"""
