"""A beamline stand-in: synthetic frames from real peak outlines, written live in I16's layouts."""
