"""Operations as library code (never click): status, report, air-gap bundles, doctor,
simulation, the demo and model export."""
