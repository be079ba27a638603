"""Create the notes table (db.create_all, as the tutorial does) and seed it.

    python manage.py [N] [--reset]

N (default 1000): notes wanted; only the missing ones are added.
--reset: empty the table first (TRUNCATE ... RESTART IDENTITY), so a run starts from exactly N.
"""
import sys

from sqlalchemy import func, text

from app import Note, app, db


def seed_note(i):
    return Note(title=f"note {i}", body=f"seed body {i} " + "lorem ipsum " * 4)


def main(argv):
    reset = "--reset" in argv
    numbers = [a for a in argv if not a.startswith("--")]
    wanted = int(numbers[0]) if numbers else 1000
    with app.app_context():
        db.create_all()
        if reset:
            db.session.execute(text(f"TRUNCATE TABLE {Note.__tablename__} RESTART IDENTITY"))
            db.session.commit()
        count = db.select(func.count()).select_from(Note)
        have = db.session.scalar(count)
        if have < wanted:
            db.session.add_all(seed_note(i) for i in range(have, wanted))
            db.session.commit()
        print(f"table {Note.__tablename__}: {db.session.scalar(count)} rows")


if __name__ == "__main__":
    main(sys.argv[1:])
