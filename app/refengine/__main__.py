import sys

from app.refengine.server import main

sys.exit(main())
