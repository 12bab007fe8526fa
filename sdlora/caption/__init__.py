"""Captioning and tagging a data folder before training (`sdlora caption`, the UI's Dataset tab).

folder.py finds the images and decides what each one gets (or why it is skipped); models.py recognises and loads
the captioner or tagger; captioners.py runs the transformers captioners (BLIP, Florence-2, chat VLMs); wd14.py runs
a WD14-style booru tagger; run.py writes the captions; tags.py edits and counts tags.
"""
